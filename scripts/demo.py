"""Run the end-to-end demo (see service/demo.py): ``python scripts/demo.py [--model ID] [--preset NAME]``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.demo import main  # noqa: E402

raise SystemExit(main())
