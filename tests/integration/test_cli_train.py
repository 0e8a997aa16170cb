"""`layerwise train` end to end, as a user runs it: a tiny Llama directory (random weights, built
from a config, nothing downloaded) and a text file, 2 pipeline stages, 20 steps; the saved model
loads in transformers and gives the held-out loss the run reported; then the run is extended to
25 steps under torchrun from a TOML config with --resume."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def _run(args: list[str], cwd: Path, timeout: int = 400) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    folder = tmp_path_factory.mktemp("cli-train")
    rng = random.Random(1)
    words = "layers stages ranks train the model on text and save it then load it again".split()
    (folder / "corpus.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(9)) for _ in range(400)))
    made = _run([sys.executable, str(ROOT / "examples" / "tiny_llama.py"), "tiny-llama"], folder)
    assert made.returncode == 0, made.stderr[-2000:]
    proc = _run([sys.executable, "-m", "layerwise", "train", "--model", "tiny-llama", "--data", "corpus.txt",
                 "--stages", "2", "--steps", "20", "--seq-len", "32", "--batch-size", "8", "--lr", "3e-3",
                 "--save-every", "10", "--out", "run", "--json"], folder)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train: 100%" in proc.stderr and "tok_s" in proc.stderr  # the progress bar
    return folder, json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_loss_falls_and_everything_is_written(run: tuple[Path, dict[str, Any]]) -> None:
    folder, s = run
    assert s["steps"] == 20 and s["partition"] == [4, 3] and s["tokens_per_s"] > 0
    assert s["final_loss"] < s["first_loss"] - 1.0 and s["eval_loss"] < s["first_loss"] - 1.0
    rows = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 21))
    assert [r["step"] for r in rows if "eval_loss" in r] == [20]
    assert s["checkpoint"].endswith("step-00000020") and Path(s["checkpoint"], "meta.json").is_file()
    assert s["out"] == str(folder / "run") and s["final"] == str(folder / "run" / "final")


def test_the_saved_model_loads_in_transformers_with_the_reported_loss(run: tuple[Path, dict[str, Any]]) -> None:
    from transformers import AutoModelForCausalLM

    from layerwise.train.data import ByteTokenizer, PackedData, tokenize

    folder, s = run
    model = AutoModelForCausalLM.from_pretrained(folder / "run" / "final").eval()
    data = PackedData(tokenize(str(folder / "corpus.txt"), ByteTokenizer()), seq_len=32, batch_size=8, seed=0,
                      eval_fraction=0.05, eval_max=256)  # the run's defaults
    total = rows = 0
    with torch.no_grad():
        for window in data.eval_batches():
            x = window[:, :-1]
            total += float(model(input_ids=x, labels=x).loss) * x.shape[0]
            rows += x.shape[0]
    assert abs(total / rows - s["eval_loss"]) < 1e-5, "transformers' loss on the held-out split equals the run's"


def test_extended_under_torchrun_from_a_toml_config(run: tuple[Path, dict[str, Any]]) -> None:
    folder, s = run
    (folder / "more.toml").write_text('model = "tiny-llama"\ndata = "corpus.txt"\nstages = 2\nsteps = 25\n'
                                      'seq-len = 32\nbatch_size = 8\nlr = 3e-3\nsave_every = 10\nout = "run"\n')
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = _run([str(torchrun), "--nproc-per-node", "2", "-m", "layerwise", "train", "--config", "more.toml",
                 "--resume", "--json"], folder)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    more = json.loads(proc.stdout.strip().splitlines()[-1])
    assert more["resumed_from"] == 20 and more["steps"] == 25 and more["checkpoint"].endswith("step-00000025")
    rows = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 26))
    wrong = _run([sys.executable, "-m", "layerwise", "train", "--config", "more.toml", "--resume", "--lr", "1e-2"], folder)
    assert wrong.returncode == 2 and "lr 0.003 -> 0.01" in wrong.stderr and "Traceback" not in wrong.stderr
