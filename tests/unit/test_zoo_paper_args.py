"""`zoo.build`'s paper-scale arguments are checked before anything is built: `layers` only at paper scale, only the
four paper-scale names, a device torch can allocate on; the CLI prints each as one `error:` line with exit status 2."""

import pytest

from synthalign_ray import zoo
from synthalign_ray.errors import UserError
from tests.conftest import cli_error_line

PAPER_NAMES = ["armorm", "image-reward", "lvlm-llava", "sd3"]


@pytest.fixture(autouse=True)
def private_zoo(tmp_path, monkeypatch):
    monkeypatch.setenv("SYNTHALIGN_ZOO", str(tmp_path))
    yield tmp_path
    assert not any(tmp_path.iterdir()), "a refused build left files behind"


def test_layers_need_paper_scale():
    with pytest.raises(zoo.ZooError, match="layers=2: only paper-scale builds"):
        zoo.build("sd3", layers=2)
    with pytest.raises(zoo.ZooError, match="tiny twins are built on the CPU"):
        zoo.build("sd3", device="cuda")
    with pytest.raises(zoo.ZooError, match="whole number >= 1"):
        zoo.build("sd3", scale="paper", layers=0)
    with pytest.raises(zoo.ZooError, match="scale='huge'"):
        zoo.build("sd3", scale="huge")


def test_an_unknown_paper_name_lists_the_four():
    with pytest.raises(zoo.ZooError) as caught:
        zoo.build("clip", scale="paper")
    assert isinstance(caught.value, UserError)
    assert f"paper scale: {', '.join(PAPER_NAMES)}" in str(caught.value)
    assert sorted(zoo.PAPER_BUILDERS) == PAPER_NAMES


@pytest.mark.parametrize("device", ["cuda:99", "gpu0"])
def test_a_bad_device_is_refused(device):
    with pytest.raises(zoo.ZooError, match=f"device '{device}' is not usable on this machine"):
        zoo.build("sd3", scale="paper", device=device, layers=1)


def test_cli_bad_device_layers_and_name_are_onecli_error_line():
    assert "device 'cuda:99' is not usable" in cli_error_line(["zoo", "build", "sd3", "--scale", "paper", "--device", "cuda:99"])
    assert "only paper-scale builds" in cli_error_line(["zoo", "build", "sd3", "--layers", "2"])
    assert "unknown paper zoo model 'clip'" in cli_error_line(["zoo", "build", "clip", "--scale", "paper"])
    assert "--scale 'huge'" in cli_error_line(["zoo", "build", "sd3", "--scale", "huge"])
