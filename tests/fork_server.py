"""A process that imports diffcap once and forks `diffcap` CLI runs on request, so a test can start (and
SIGKILL) many training processes without paying Python's and torch's start-up each time.

Protocol, one JSON object a line: {"run": [argv...], "log": path} -> {"pid": N}; {"wait": N} -> {"code": exit
code, negative = killed by that signal}. The server sets torch to one thread before anything runs, so forked
children never inherit a thread pool (not fork-safe) and every run computes the same way, and turns off tqdm's
monitor thread; it reports any other thread it has when ready, and the client refuses to fork from such a server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SERVER = r'''
import json, os, sys, traceback
os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
import threading
import torch
import tqdm
torch.set_num_threads(1)
torch.set_num_interop_threads(1)
# no tqdm monitor thread: a fork while it holds tqdm's lock leaves the child's first progress bar waiting forever
tqdm.tqdm.monitor_interval = 0
import accelerate, torch.utils.tensorboard  # noqa: F401 - imported once, here
import diffcap.cli, diffcap.train  # noqa: F401
from diffcap.data.prepare import load_encoder
from diffcap.text.space import load_backbone
warm = json.loads(sys.argv[1])
for name in warm.get("backbones", []):
    load_backbone(name)
for name in warm.get("encoders", []):
    load_encoder(name)
print(json.dumps({"ready": True, "threads": [t.name for t in threading.enumerate() if t is not threading.main_thread()]}),
      flush=True)
for line in sys.stdin:
    request = json.loads(line)
    if "run" in request:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                code = diffcap.cli.main(request["run"])
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
    elif "wait" in request:
        _, status = os.waitpid(request["wait"], 0)
        print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)
'''


class ForkServer:
    def __init__(self, backbones: list[str] = (), encoders: list[str] = ()) -> None:
        warm = json.dumps({"backbones": list(backbones), "encoders": list(encoders)})
        self.process = subprocess.Popen([sys.executable, "-c", SERVER, warm],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = self._read()
        # a fork copies only the calling thread, and any lock another thread held stays held in the child
        assert ready == {"ready": True, "threads": []}, f"the fork server must fork from one thread: {ready}"

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"fork server died (exit code {self.process.poll()})")
        return json.loads(line)

    def _ask(self, request: dict) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._read()

    def start(self, argv: list[str], log: Path) -> int:
        """Fork a child running `diffcap ARGV`; its pid."""
        return self._ask({"run": argv, "log": str(log)})["pid"]

    def wait(self, pid: int) -> int:
        """The child's exit code (negative: the signal that killed it)."""
        return self._ask({"wait": pid})["code"]

    @staticmethod
    def exited(pid: int) -> bool:
        """Whether the child has already ended (a zombie waiting to be reaped)."""
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
        except (FileNotFoundError, ProcessLookupError):
            return True

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # a slow interpreter shutdown on a busy machine: not the test's subject
            self.process.kill()
            self.process.wait()
