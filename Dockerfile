# VisionZip Live on a GPU box: docker build -t visionzip-live . && docker run --gpus all -p 7860:7860 visionzip-live
# Mount a Hugging Face cache to keep checkpoints between runs: -v ~/.cache/huggingface:/home/user/.cache/huggingface
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 GRADIO_ANALYTICS_ENABLED=False
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# PyPI's torch wheels for Linux carry CUDA; the base image supplies the runtime the driver talks to.
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY requirements.txt /tmp/requirements.txt
RUN pip install --upgrade pip && pip install -r /tmp/requirements.txt

RUN useradd --create-home --uid 1000 user
USER user
ENV HOME=/home/user
WORKDIR /home/user/app
COPY --chown=user:user app.py requirements.txt ./
COPY --chown=user:user app ./app
COPY --chown=user:user visionzip ./visionzip
COPY --chown=user:user assets ./assets

EXPOSE 7860
# VISIONZIP_MODEL picks the default checkpoint (e.g. llava-hf/llava-v1.6-vicuna-7b-hf); unset, the tiny offline model.
CMD ["python", "app.py", "--host", "0.0.0.0", "--port", "7860"]
