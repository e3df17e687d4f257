# VisionZip Live on a GPU box: docker build -t visionzip-live . && docker run --gpus all -p 7860:7860 visionzip-live
# Mount a Hugging Face cache to keep checkpoints between runs: -v ~/.cache/huggingface:/home/user/.cache/huggingface
# PyPI's torch 2.13 wheels for Linux bring their own CUDA 13 libraries (nvidia-*-cu13 wheels), so the base
# image only needs the container toolkit's plumbing: the small "base" flavour of the matching CUDA. The
# host's NVIDIA driver must support CUDA 13 (R580 or newer); `nvidia-smi` on the host says which it has.
FROM nvidia/cuda:13.0.2-base-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 GRADIO_ANALYTICS_ENABLED=False
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# Ubuntu 24.04's python3 is 3.12: requirements.txt resolves there too (PyAV 19 instead of 18).
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY requirements.txt /tmp/requirements.txt
RUN pip install --upgrade pip && pip install -r /tmp/requirements.txt

# Ubuntu 24.04 images ship a user "ubuntu" with uid 1000, the uid Spaces and most hosts expect: replace it.
RUN (userdel --remove ubuntu 2>/dev/null || true) && useradd --create-home --uid 1000 user
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
