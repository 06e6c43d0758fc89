"""`pathways train` as a long job: Ctrl-C reports where it stopped and exits 130 without a
traceback, step numbers agree between the progress bar and checkpoint names, a run resumes from the
newest checkpoint, and TensorBoard scalars and held-out evaluations are written; then `pathways
generate` samples from the checkpoint directory."""

import json
import re
import signal
import struct
import subprocess
import sys
import time

import pytest

TRAIN = [sys.executable, "-m", "runtime.cli", "train", "--config", "palm-tiny", "n_layers=1",
         "seq_len=32", "--islands", "1", "--mesh", "fsdp=2", "--global-batch", "4", "--in-process"]


def _scalar_tags(logdir) -> set[str]:
    from tensorboardX.proto import event_pb2

    tags = set()
    for path in logdir.glob("events.out.tfevents.*"):
        data, i = path.read_bytes(), 0
        while i < len(data):  # TFRecord: length, its CRC, the record, its CRC
            (length,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + length])
            tags.update(value.tag for value in event.summary.value)
            i += 12 + length + 4
    return tags


@pytest.mark.slow
def test_interrupt_resume_scalars_and_generate(tmp_path):
    ckpt, board = tmp_path / "ckpt", tmp_path / "tb"
    common = [*TRAIN, "--checkpoint-dir", str(ckpt), "--keep", "2", "--tensorboard-dir", str(board),
              "--eval-every", "2"]
    proc = subprocess.Popen([*common, "--steps", "100000", "--checkpoint-every", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while not (ckpt / "step_3").exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint step_3 within 600 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert "compiling" in err  # shown while the first step compiles
    found = re.search(r"interrupted at step (\d+); last checkpoint step_(\d+) in (\S+); continue with "
                      r"--resume", err)
    assert found, err[-3000:]
    stopped, last = int(found[1]), int(found[2])
    assert found[3] == str(ckpt) and 3 <= last <= stopped
    assert int(re.findall(r"step=(\d+)", err)[-1]) == stopped  # the bar counts as checkpoints do
    assert sorted(int(p.name[5:]) for p in ckpt.glob("step_*"))[-1] == last
    assert len(list(ckpt.glob("step_*"))) <= 2  # --keep 2

    resumed = subprocess.run([*common, "--steps", str(last + 2), "--resume", "--quiet", "--json"],
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {last}" in resumed.stdout
    report = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert [h["step"] for h in report["history"]] == [last + 1, last + 2]
    assert (ckpt / f"step_{last + 2}").exists()
    assert all(e["perplexity"] > 1 for e in report["evals"]) and report["evals"]
    tags = _scalar_tags(board)
    assert {"train/loss", "train/tokens_per_s", "train/learning_rate", "eval/loss",
            "eval/perplexity"} <= tags

    another = [word.replace("n_layers=1", "n_layers=2") for word in TRAIN]
    other = subprocess.run([*another, "--checkpoint-dir", str(ckpt), "--steps", "1", "--quiet"],
                           capture_output=True, text=True, timeout=900)
    assert other.returncode == 2 and "another run" in other.stderr and "n_layers" in other.stderr

    gen = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "generate", "--checkpoint", str(ckpt), "--prompt",
         "The island", "--max-new-tokens", "8"], capture_output=True, text=True, timeout=600)
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert gen.stdout.startswith("The island")
