"""scripts/comfy_host.py's `serve`: --cpu only without an accelerator, the user's arguments after the defaults (as
ComfyUI's own parser reads them, the later ones win), its own --help, the models folders named first, and a
start-up log without import tracebacks (ComfyUI's audio nodes, which need torchaudio, reported in one line)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ci_rules import skip_or_fail

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def comfy_host():
    spec = importlib.util.spec_from_file_location("comfy_host_script", REPO / "scripts" / "comfy_host.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module     # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


AUDIO_TRACEBACK = """Traceback (most recent call last):
  File "/c/nodes.py", line 2146, in load_custom_node
    module_spec.loader.exec_module(module)
  File "/c/comfy_extras/nodes_audio.py", line 4, in <module>
    import torchaudio
ModuleNotFoundError: No module named 'torchaudio'

Cannot import /c/comfy_extras/nodes_audio.py module for custom nodes: No module named 'torchaudio'
"""
OTHER_TRACEBACK = """Traceback (most recent call last):
  File "/c/custom_nodes/broken/__init__.py", line 1, in <module>
    import nothing_here
ModuleNotFoundError: No module named 'nothing_here'

Cannot import /c/custom_nodes/broken module for custom nodes: No module named 'nothing_here'
"""
SUMMARY = """WARNING: some comfy_extras/ nodes did not import correctly. This may be because they are missing some dependencies.

IMPORT FAILED: nodes_audio.py
{more}
This issue might be caused by new missing dependencies added the last time you updated ComfyUI.
Please do a: pip install -r requirements.txt

"""


def filtered(comfy_host, text: str) -> str:
    out = []
    log = comfy_host.StartupLog(out.append)
    for line in text.splitlines(True):
        log.line(line)
    log.close()
    return "".join(out)


def test_audio_import_tracebacks_become_one_line(comfy_host):
    text = ("Device: cpu\ntorchaudio missing, ACE model will be broken\n" + AUDIO_TRACEBACK + OTHER_TRACEBACK
            + SUMMARY.format(more="") + "Starting server\n")
    out = filtered(comfy_host, text)
    assert "torchaudio'" not in out and "ACE model" not in out and "IMPORT FAILED" not in out
    assert out.count("audio nodes are off") == 1 and "nodes_audio.py not loaded" in out
    assert OTHER_TRACEBACK in out, "other import failures are shown unchanged"
    assert out.startswith("Device: cpu\n") and out.endswith("Starting server\n")


def test_summary_kept_when_other_extras_failed(comfy_host):
    out = filtered(comfy_host, AUDIO_TRACEBACK + SUMMARY.format(more="IMPORT FAILED: nodes_other.py\n"))
    assert "IMPORT FAILED: nodes_other.py" in out and "audio nodes are off" in out


def test_cpu_flag_only_without_an_accelerator(comfy_host):
    assert comfy_host.serve_args([], None)[0] == "--cpu"
    assert "--cpu" not in comfy_host.serve_args([], "cuda NVIDIA H200")
    assert comfy_host.serve_args(["--cpu"], None).count("--cpu") == 1
    import torch

    # Asked of a Python with torch (the venv's): the same answer as torch in this process.
    found = comfy_host.accelerator(Path(sys.executable))
    assert (found is not None) == (torch.cuda.is_available() or torch.backends.mps.is_available())
    if torch.cuda.is_available():
        assert found.startswith("cuda")


def comfyui_parses(args: list[str], keys=("cpu", "listen", "port", "front_end_root")) -> dict:
    """What this host's own ComfyUI parser (comfy/cli_args.py) makes of `args`, as main.py would."""
    code = ("import json, sys; keys = json.loads(sys.argv[2]); sys.argv = ['main.py'] + json.loads(sys.argv[1]); "
            "import comfy.options; comfy.options.enable_args_parsing(); from comfy.cli_args import args; "
            "print(json.dumps({k: v for k, v in vars(args).items() if k in keys}))")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(args), json.dumps(list(keys))],
                          cwd=os.environ["COMFYUI_PATH"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_serve_appends_the_users_arguments_to_its_defaults(comfy_host, tmp_path):
    """`serve --port 9000` keeps --listen 127.0.0.1 and, on a CPU machine, --cpu (any argument used to replace all
    defaults, so `serve --front-end-root X` crashed on a CPU machine with "Found no NVIDIA driver")."""
    args = comfy_host.serve_args(["--port", "9000", "--front-end-root", str(tmp_path)], None)
    assert comfyui_parses(args) == {"cpu": True, "listen": "127.0.0.1", "port": 9000, "front_end_root": str(tmp_path)}
    on_gpu = comfyui_parses(comfy_host.serve_args(["--listen", "0.0.0.0"], "cuda NVIDIA H200"))
    assert on_gpu["cpu"] is False and on_gpu["listen"] == "0.0.0.0" and on_gpu["port"] == 8188


def test_serve_help_is_ours_then_comfyuis():
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "comfy_host.py"), "serve", "--help"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    ours, _, theirs = done.stdout.partition("ComfyUI's own options")
    for needed in ("serve [--host", "--host 0.3.75", "--listen 127.0.0.1 --port 8188", "--cpu", "LINFUSION_TORCH_SPEC",
                   "LINFUSION_COMFYUI_SOURCE", "COMFYUI_PATH"):
        assert needed in ours, needed
    assert "--front-end-root" in theirs and "--listen" in theirs, "ComfyUI's own --help is not shown after ours"


@pytest.mark.slow
def test_serve_log_names_models_and_has_no_tracebacks(tmp_path):
    """The real `serve` path through the real ComfyUI start-up (quick-test mode: it exits once loaded)."""
    base = tmp_path / "base"
    (base / "custom_nodes").mkdir(parents=True)
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "comfy_host.py"), "serve", "--cpu",
                           "--quick-test-for-ci", "--base-directory", str(base)],
                          capture_output=True, text=True, timeout=600)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert "[comfy_host] models folders:" in log.splitlines()[0] + log.splitlines()[1]
    assert "Traceback" not in log, log
    try:
        import torchaudio  # noqa: F401
    except ImportError:
        assert log.count("audio nodes are off") == 1


def test_two_hosts_and_the_host_choice(comfy_host, monkeypatch):
    """test runs every host unless --host picks one; serve and python use the newest; under COMFYUI_PATH there
    is only the developer's own ComfyUI."""
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    assert list(comfy_host.HOSTS) == ["0.3.75", "0.33"] and comfy_host.NEWEST == "0.33"
    hosts, rest = comfy_host.pick_hosts(["-x", "tests/test_patch.py"], list(comfy_host.HOSTS))
    assert [h.version for h in hosts] == ["0.3.75", "0.33.0"] and rest == ["-x", "tests/test_patch.py"]
    for args in (["--host", "0.3.75", "-q"], ["--host=0.3.75", "-q"]):
        hosts, rest = comfy_host.pick_hosts(args, list(comfy_host.HOSTS))
        assert [h.name for h in hosts] == ["0.3.75"] and rest == ["-q"]
    assert [h.name for h in comfy_host.pick_hosts([], [comfy_host.NEWEST])[0]] == ["0.33"]
    with pytest.raises(SystemExit, match="unknown host '0.40'"):
        comfy_host.pick_hosts(["--host", "0.40"], list(comfy_host.HOSTS))
    monkeypatch.setenv("COMFYUI_PATH", "/somewhere/ComfyUI")
    assert len(comfy_host.pick_hosts([], list(comfy_host.HOSTS))[0]) == 1
    # Each host has its own folder, movable by its own variable; the 0.33 archive is checked by its sha256.
    monkeypatch.setenv("LINFUSION_HOST_DIR_033", "/elsewhere/h033")
    assert comfy_host.HOSTS["0.33"].dir == Path("/elsewhere/h033") and comfy_host.HOSTS["0.3.75"].dir != Path("/elsewhere/h033")
    assert len(comfy_host.HOSTS["0.33"].archive_sha256) == 64


def test_summary_line_is_recognised(comfy_host):
    for line in ("======= 275 passed, 2 skipped in 812.31s (0:13:32) =======",
                 "===== 1 failed, 3 passed, 1 error in 9.10s =====", "==== no tests ran in 0.01s ===="):
        assert comfy_host.SUMMARY_LINE.match(line), line
    assert not comfy_host.SUMMARY_LINE.match("tests/test_patch.py ....")


def test_host_venvs_share_one_torch(comfy_host):
    """The host venv this test runs in reads torch from the one shared layer (.host-torch/) and holds no copy of
    its own: a copy in each venv once filled CI's disk."""
    import torch
    host = comfy_host.HOSTS.get(os.environ.get("LINFUSION_HOST", ""))
    if host is None or Path(sys.prefix).resolve() != host.dir / "venv":
        pytest.skip("not inside a host venv that scripts/comfy_host.py built (COMFYUI_PATH with the developer's Python)")
    site = comfy_host.torch_layer_site()
    assert Path(torch.__file__).resolve().is_relative_to(site), f"torch comes from {torch.__file__}, not {site}"
    own = comfy_host.venv_site_packages(Path(sys.executable))
    assert not (own / "torch").exists() and not (own / "nvidia").exists(), f"{own} holds a torch of its own"
    assert (own / "linfusion_torch_layer.pth").read_text().strip() == str(site)


def test_serve_manager_adds_enable_manager_once(comfy_host):
    args = comfy_host.serve_args(["--port", "9000"], "cuda H100", "--enable-manager")
    assert args == comfy_host.SERVE_DEFAULTS + ["--enable-manager", "--port", "9000"]
    assert comfy_host.serve_args(["--enable-manager"], None, "--enable-manager").count("--enable-manager") == 1
    assert "--enable-manager" not in comfy_host.serve_args([], None)


def test_manager_comes_from_comfyuis_own_pin_where_it_has_the_flag(comfy_host):
    """0.33 pins comfyui_manager in manager_requirements.txt and has --enable-manager; 0.3.75 has neither, and
    serve --manager refuses it (checked on the host this test runs on)."""
    comfy = Path(os.environ["COMFYUI_PATH"])
    flag = comfy_host.manager_flag(comfy)
    if (comfy / "manager_requirements.txt").is_file():
        assert flag == "--enable-manager"
        assert comfy_host.manager_requirement(comfy) == ["-r", str(comfy / "manager_requirements.txt")]
        assert "comfyui_manager" in (comfy / "manager_requirements.txt").read_text()
    else:
        assert flag is None


@pytest.mark.slow
def test_serve_manager_installs_comfyui_manager_into_the_venv(comfy_host, tmp_path, monkeypatch):
    """install_manager puts the registry's comfyui-manager (ComfyUI's own pin) into a venv, where main.py's
    --enable-manager finds it (importlib.util.find_spec), and a second call installs nothing (its stamp). The
    wheels come from what scripts/comfy_host.py test downloaded at set-up, installed with no index: the test
    reaches nothing beyond this machine."""
    comfy = Path(os.environ["COMFYUI_PATH"])
    if comfy_host.manager_flag(comfy) is None:
        from ci_rules import skip_for_host_difference
        skip_for_host_difference("0.3.75 has no such option")
    wheels = os.environ.get(comfy_host.MANAGER_WHEELS_ENV)
    if not wheels:
        skip_or_fail(f"{comfy_host.MANAGER_WHEELS_ENV} is unset: run through scripts/comfy_host.py test, which "
                     "downloads ComfyUI-Manager's wheels at set-up")
    monkeypatch.delenv("COMFYUI_PATH")          # install_manager treats COMFYUI_PATH as the user's own ComfyUI
    monkeypatch.setenv("LINFUSION_TEST_MANAGER_HOST", str(tmp_path))
    host = comfy_host.Host("test", "0.33.0", "LINFUSION_TEST_MANAGER_HOST", "unused")
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True)
    py = tmp_path / "venv" / "bin" / "python"
    comfy_host.install_manager(host, py, comfy, Path(wheels))
    found = subprocess.run([str(py), "-c", "import importlib.util as u; print(u.find_spec('comfyui_manager').origin)"],
                           capture_output=True, text=True, check=True).stdout
    assert found.strip().endswith("comfyui_manager/__init__.py"), found
    calls = []
    monkeypatch.setattr(comfy_host, "run", lambda cmd, **kw: calls.append(cmd))
    comfy_host.install_manager(host, py, comfy, Path(wheels))
    assert calls == [], "installed again although its stamp matched"


def test_distributed_serve_plans_ranks_as_torchrun(comfy_host, tmp_path):
    """serve --gpus 2 / --ranks --rank --master: torchrun's variables per rank, rank 0 with the user's arguments,
    the others on 127.0.0.1 at the next ports with an output folder of their own, as ComfyUI parses them."""
    _, rest = comfy_host.take_options(["--gpus", "2", "--port", "9000"], comfy_host.DIST_OPTIONS)
    args = comfy_host.serve_args(rest, None)
    r0, r1 = comfy_host.plan_ranks({"--gpus": "2"}, args, None, tmp_path)
    for k, r in enumerate((r0, r1)):
        assert {v: r.env[v] for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LINFUSION_DISTRIBUTED")} == \
               {"RANK": str(k), "WORLD_SIZE": "2", "LOCAL_RANK": str(k), "LINFUSION_DISTRIBUTED": "1"}
        assert r.env["MASTER_ADDR"] == "127.0.0.1" and r.env["MASTER_PORT"] == r0.env["MASTER_PORT"]
    assert comfyui_parses(r0.args)["port"] == 9000
    follower = comfyui_parses(r1.args, ("cpu", "listen", "port", "output_directory"))
    assert follower["port"] == 9001 and follower["listen"] == "127.0.0.1" and follower["cpu"] is True
    assert follower["output_directory"] == str(tmp_path / "rank1" / "output")
    # machine 2 of 4: ranks 2 and 3, rendezvous at rank 0's machine
    gpu = "cuda NVIDIA H100"   # one GPU per local rank (ComfyUI's --cuda-device), none with --cpu
    ranks = comfy_host.plan_ranks({"--ranks": "4", "--rank": "2", "--gpus": "2", "--master": "10.0.0.1:29500"},
                                  comfy_host.serve_args(rest, gpu), gpu, tmp_path)
    assert [(r.rank, r.env["MASTER_ADDR"], r.env["MASTER_PORT"], r.env["LOCAL_RANK"]) for r in ranks] == \
           [(2, "10.0.0.1", "29500", "0"), (3, "10.0.0.1", "29500", "1")]
    assert [str(comfyui_parses(r.args, ("cuda_device",))["cuda_device"]) for r in ranks] == ["0", "1"]   # an int on 0.3.75
    assert "--cuda-device" not in r1.args
    with pytest.raises(SystemExit, match="--master"):
        comfy_host.plan_ranks({"--ranks": "2", "--rank": "1"}, args, None, tmp_path)
