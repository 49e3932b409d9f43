# muselab studio, ready for a Hugging Face Space (Docker SDK, port 7860) or any Docker host.
# CPU by default; the fast CPU defaults (bf16 only where the chip has it) are chosen at run time.
FROM python:3.11-slim

RUN apt-get update && apt-get install -y --no-install-recommends libsndfile1 && rm -rf /var/lib/apt/lists/*
# Spaces run the container as user 1000.
RUN useradd -m -u 1000 user
USER user
ENV HOME=/home/user PATH=/home/user/.local/bin:$PATH \
    MUSELAB_DATA_DIR=/home/user/data HF_HOME=/home/user/.cache/huggingface PYTHONUNBUFFERED=1
WORKDIR /home/user/app

# The CPU wheel of PyTorch first, so the project does not pull a multi-GB CUDA build.
RUN pip install --no-cache-dir --user torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY --chown=user pyproject.toml README.md ./
COPY --chown=user src ./src
RUN pip install --no-cache-dir --user .

EXPOSE 7860
# The UI binds all interfaces inside the container only because the Space's proxy is in front of it.
ENV MUSELAB_ALLOW_REMOTE_UI=1
# The one-time OpenVINO conversions (and the weights' download) before the port opens, so the
# Space's first visitor does not wait for them; the studio starts even if they fail (offline).
CMD ["sh", "-c", "muselab models convert; muselab models convert --kind music; exec muselab ui --host 0.0.0.0 --port 7860"]
