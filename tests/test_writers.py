"""The metric writers: metrics.jsonl, the plots, TensorBoard (without TensorFlow) and W&B.

Records are written to the writer objects directly: no training run, no compile.
"""

import io
import json
import struct
import sys
import types

import numpy as np
import pytest
from PIL import Image

from jaxdiff.config import get_config
from jaxdiff.training import writers

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _config(**training):
  config = get_config()
  for key, value in training.items():
    config.training[key] = value
  return config


def _png(path) -> np.ndarray:
  """The pixels of a PNG file, after checking it is a whole one."""
  data = path.read_bytes()
  assert data.startswith(PNG_MAGIC) and data.endswith(b"IEND\xaeB`\x82"), path
  with Image.open(io.BytesIO(data)) as im:
    im.verify()
  return np.asarray(Image.open(io.BytesIO(data)))


def _grid(channels: int) -> np.ndarray:
  return np.random.default_rng(channels).integers(0, 256, (10, 14, channels), dtype=np.uint8)


# ----------------------------------------------------------------------------- metrics.jsonl


def test_jsonl_appends_reads_back_and_truncates(tmp_path):
  path = tmp_path / "run" / "metrics.jsonl"
  log = writers.MetricsLog(path)
  for step in range(1, 6):
    log.write_scalars(step, {"step": step, "loss": 1.0 / step, "note": "x"})
  log.write_scalars(5, {"eval_bpd": 3.5})
  lines = path.read_text().splitlines()
  assert json.loads(lines[0]) == {"step": 1, "loss": 1.0, "note": "x"}
  assert json.loads(lines[-1]) == {"step": 5, "eval_bpd": 3.5}
  assert log.read() == log.records and len(log.records) == 6

  resumed = writers.MetricsLog(path)  # a resumed run starts from the file's history
  assert resumed.records == log.records
  resumed.truncate_after(3)
  assert [r["step"] for r in resumed.read()] == [1, 2, 3] == [r["step"] for r in resumed.records]


def test_jsonl_survives_a_torn_last_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo')  # killed mid-append
  log = writers.MetricsLog(path)
  assert log.records == [{"step": 1, "loss": 0.5}]
  log.truncate_after(1)  # what a resume does: the torn line goes
  assert path.read_text() == '{"step": 1, "loss": 0.5}\n'
  path.write_text('{"st\n{"step": 2}\n')
  with pytest.raises(json.JSONDecodeError):  # elsewhere, damage is an error
    writers.MetricsLog(path)


def test_jsonl_is_rewritten_whole_where_append_is_unavailable(tmp_path, monkeypatch):
  calls = []
  real = writers.files.atomic_path

  def atomic_path(path):
    calls.append(path)
    return real(path)

  monkeypatch.setattr(writers.files, "is_uri", lambda path: True)  # as for gs://
  monkeypatch.setattr(writers.files, "atomic_path", atomic_path)
  log = writers.MetricsLog(tmp_path / "metrics.jsonl")
  log.write_scalars(1, {"loss": 0.5})
  log.write_scalars(2, {"loss": 0.25})
  assert len(calls) == 2
  assert writers.MetricsLog(tmp_path / "metrics.jsonl").records == [
    {"step": 1, "loss": 0.5},
    {"step": 2, "loss": 0.25},
  ]


# ----------------------------------------------------------------------------- the run's writer


def test_plots_are_drawn_at_each_log_without_an_end_of_run(tmp_path):
  log = writers.make(_config(), tmp_path, enabled=True)
  log.write_scalars(1, {"step": 1, "loss": 0.5, "lr": 1e-4})
  assert _png(tmp_path / "loss.png").ndim == 3
  assert not (tmp_path / "eval.png").exists()  # no evaluation yet
  first = (tmp_path / "loss.png").read_bytes()
  log.write_scalars(2, {"step": 2, "loss": 0.25})
  assert (tmp_path / "loss.png").read_bytes() != first  # redrawn
  log.write_scalars(2, {"eval_bpd": 3.2, "eval_bpd_stderr": 0.1, "eval_fd": 40.0})
  _png(tmp_path / "eval.png")
  assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 3 and json.loads(lines[-1])["eval_fd"] == 40.0
  log.close()


def test_plots_start_from_the_history_a_resume_keeps(tmp_path):
  (tmp_path / "metrics.jsonl").write_text(
    "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 9))
  )
  log = writers.make(_config(), tmp_path, enabled=True)
  log.truncate_after(4)
  plots = next(w for w in log.writers if isinstance(w, writers.Plots))
  log.write_scalars(5, {"loss": 0.2})
  assert [r["step"] for r in plots.records] == [1, 2, 3, 4, 5]


def test_a_disabled_writer_writes_nothing(tmp_path):
  log = writers.make(_config(tensorboard=True), tmp_path / "run", enabled=False)
  log.truncate_after(0)
  log.write_scalars(1, {"loss": 0.5})
  log.write_images(1, {"samples": _grid(1)})
  log.flush()
  log.close()
  assert not (tmp_path / "run").exists()


def _tfrecords(path):
  """The records of a TFRecord file: [u64 length][u32 crc][data][u32 crc], CRCs not checked."""
  data, pos = path.read_bytes(), 0
  while pos < len(data):
    (length,) = struct.unpack("<Q", data[pos : pos + 8])
    yield data[pos + 12 : pos + 12 + length]
    pos += 12 + length + 4


def _events(logdir):
  from tensorboardX.proto import event_pb2

  (path,) = logdir.glob("events.out.tfevents.*")
  for raw in _tfrecords(path):
    event = event_pb2.Event()
    event.ParseFromString(raw)
    yield event


def test_tensorboard_scalars_and_images_without_tensorflow(tmp_path, monkeypatch):
  pytest.importorskip("tensorboardX", reason="TensorBoard output needs jaxdiff[tensorboard]")
  monkeypatch.setitem(sys.modules, "tensorflow", None)  # importing TensorFlow would fail
  log = writers.make(_config(tensorboard=True), tmp_path, enabled=True)
  log.truncate_after(1)  # a resume from step 1: TensorBoard drops older events past it
  log.write_scalars(2, {"step": 2, "loss": 0.5, "lr": 1e-4, "note": "not a number"})
  log.write_scalars(2, {"eval_bpd": 3.25, "eval_fd": 12.5})
  grey, rgb = _grid(1), _grid(3)
  log.write_images(2, {"samples": grey, "rgb": rgb})
  log.close()

  events = list(_events(tmp_path / "tensorboard"))
  assert any(e.step == 2 and e.HasField("session_log") for e in events)  # purge_step
  values = [(e.step, v) for e in events for v in e.summary.value]
  scalars = {v.tag: (step, v.simple_value) for step, v in values if v.HasField("simple_value")}
  assert scalars == {
    "loss": (2, 0.5),
    "lr": (2, pytest.approx(1e-4)),
    "eval_bpd": (2, 3.25),
    "eval_fd": (2, 12.5),
  }
  pictures = {v.tag: np.asarray(Image.open(io.BytesIO(v.image.encoded_image_string)))
              for _, v in values if v.HasField("image")}  # fmt: skip
  np.testing.assert_array_equal(pictures["rgb"], rgb)
  np.testing.assert_array_equal(pictures["samples"].reshape(10, 14, -1)[..., 0], grey[..., 0])


@pytest.mark.parametrize(
  "module, option, extra, off",
  [
    ("tensorboardX", {"tensorboard": True}, "tensorboard", "training.tensorboard=False"),
    ("wandb", {"wandb_project": "p"}, "wandb", "training.wandb_project=''"),
  ],
)
@pytest.mark.parametrize("enabled", [True, False])  # every process fails alike, at setup
def test_a_missing_package_is_one_clear_error(
  tmp_path, monkeypatch, module, option, extra, off, enabled
):
  monkeypatch.setitem(sys.modules, module, None)
  with pytest.raises(ImportError) as info:
    writers.make(_config(**option), tmp_path, enabled=enabled)
  assert f"pip install 'jaxdiff[{extra}]'" in str(info.value)
  assert f"--config.{off}" in str(info.value)
  assert not list(tmp_path.iterdir())  # raised before anything was written


# ----------------------------------------------------------------------------- W&B


class _FakeWandb(types.ModuleType):
  """What the writer uses of ``wandb``, recorded."""

  def __init__(self):
    super().__init__("wandb")
    self.inits, self.logged, self.finished = [], [], []
    self.Image = lambda array: ("Image", np.asarray(array).shape)

  def init(self, **kwargs):
    self.inits.append(kwargs)
    fake = self
    return types.SimpleNamespace(
      log=lambda data, step: fake.logged.append((step, data)),
      finish=lambda exit_code: fake.finished.append(exit_code),
    )


def test_wandb_logs_config_scalars_images_and_resumes_the_same_run(tmp_path, monkeypatch):
  fake = _FakeWandb()
  monkeypatch.setitem(sys.modules, "wandb", fake)
  monkeypatch.delenv("WANDB_DIR", raising=False)
  config = _config(wandb_project="proj")
  workdir = tmp_path / "my_run"
  log = writers.make(config, workdir, enabled=True)
  log.write_scalars(3, {"step": 3, "loss": 0.5, "note": "x"})
  log.write_images(3, {"samples": _grid(1)})
  log.close()
  writers.make(config, workdir, enabled=True).close()  # resumed

  first, second = fake.inits
  assert first["project"] == "proj" and first["name"] == "my_run"
  assert first["resume"] == "allow" and first["dir"] == str(workdir)
  assert first["config"]["training"]["wandb_project"] == "proj"
  assert second["id"] == first["id"] == (workdir / "wandb_id").read_text().strip()
  assert fake.logged == [(3, {"loss": 0.5}), (3, {"samples": ("Image", (10, 14))})]
  assert fake.finished == [0, 0]


@pytest.mark.slow  # the real wandb (a large package; jaxdiff[wandb]), offline
def test_wandb_offline_run(tmp_path, monkeypatch):
  pytest.importorskip("wandb", reason="W&B output needs jaxdiff[wandb]")
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_files"))
  monkeypatch.setenv("WANDB_SILENT", "true")
  (tmp_path / "wandb_files").mkdir()
  log = writers.make(_config(wandb_project="jaxdiff-test"), tmp_path / "run", enabled=True)
  log.write_scalars(1, {"loss": 0.5, "lr": 1e-4})
  log.write_scalars(1, {"eval_bpd": 3.0})
  log.write_images(1, {"samples": _grid(3)})
  log.close()
  run_id = (tmp_path / "run" / "wandb_id").read_text().strip()
  (run_dir,) = (tmp_path / "wandb_files" / "wandb").glob(f"offline-run-*-{run_id}")
  assert (run_dir / f"run-{run_id}.wandb").stat().st_size > 0
  assert list(run_dir.glob("files/media/images/samples_*.png"))
