"""examples/vision/mllm_demo.yaml as its comments run it: LLaMA-Factory's image conversations
prepared, trained (the projector alone) and answered with an image, on a tiny LLaVA."""

from __future__ import annotations

import json
from pathlib import Path

from chattune.cli import main

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "vision" / "mllm_demo.yaml"


def test_the_vision_example_prepares_trains_and_answers_with_an_image(tiny_vlms, shared_data, tmp_path, capsys):
    data = shared_data / "mllm_demo.json"
    overrides = [f"model_name_or_path={tiny_vlms('llava')}", f"train_files=[{data}]",
                 f"output_dir={tmp_path / 'run'}", "max_steps=3"]
    assert main(["data", "prepare", str(EXAMPLE), *overrides]) == 0
    out = capsys.readouterr().out
    assert "[train] rows in 6, out 6, truncated 0, dropped 0" in out
    assert "rows with images 6, images 8, image tokens 136 (never supervised)" in out
    assert main(["train", str(EXAMPLE), *overrides]) == 0
    run = tmp_path / "run"
    manifest = json.loads((run / "chattune.json").read_text())
    assert manifest["method"]["name"] == "freeze"
    assert manifest["vision"] == {"model_type": "llava", "image_token": "<image>", "projector": "trained",
                                  "vision_tower": "frozen"}
    assert (run / "processor_config.json").is_file()
    capsys.readouterr()

    from chattune.inference.generate import answer
    from chattune.inference.runs import load_run

    loaded = load_run(str(run))
    photo = str(shared_data / "mllm_demo_data" / "1.jpg")
    seq, = answer(loaded, [[{"role": "user", "content": "<image>Who are they?", "images": [photo]}]],
                  max_new_tokens=4, temperature=0.0)
    assert seq.error is None and len(seq.generated) >= 1
