"""qaas HTTP service: settings, database, API routers and the app factory (``service.app.create_app``)."""
