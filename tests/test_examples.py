"""Each example reproduces a seed tutorial; each runs here, in its own process as a user would run it, and its
result is checked."""

import re
import subprocess
import sys

from tests.conftest import ROOT


def run_example(name: str, *args: str) -> str:
    out = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return out.stdout


def numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+\.\d+", text)]


def test_linear_regression_recovers_weight_and_bias():
    weight, _, bias, _, _ = numbers(run_example("linear_regression.py"))[:5]
    assert abs(weight - 0.7) <= 0.02 and abs(bias - 0.3) <= 0.02


def test_sine_fit_reaches_test_mse_below_0_01():
    assert numbers(run_example("sine_fit.py"))[-1] < 0.01


def test_mlp_and_cnn_classify_digits():
    for model in ("mlp", "cnn"):
        out = run_example("classify_images.py", "--model", model, "--epochs", "20", "--batch-size", "16")
        assert float(out.split("test accuracy ")[1].split("%")[0]) >= 95.0, out


def test_two_stage_training_continues_the_loss_curve():
    out = run_example("two_stage.py")
    one = numbers(out.splitlines()[0])
    two = numbers(out.splitlines()[1])
    assert len(one) == 3 and len(two) == 3
    assert two[0] < one[-1] and two[-1] < two[0]


def test_gan_learns_the_target_mean_with_two_models_in_one_checkpoint():
    out = run_example("gan.py")
    mean = numbers(out)[0]
    assert abs(mean - 3.0) < 0.5, out


def test_own_loop_trains_and_saves_its_final_state(tmp_path):
    out = run_example("own_loop.py", "--run-dir", str(tmp_path), "--epochs", "2")
    assert float(out.split("epoch 2: test accuracy ")[1].split("%")[0]) >= 80.0, out
    assert "saved step 90" in out and (tmp_path / "final" / "manifest.json").is_file()
