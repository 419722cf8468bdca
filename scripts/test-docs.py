#!/usr/bin/env python3
"""Runs the code blocks of the READMEs, as a new user would, against real daemons.

Every ```sh, ```python, ```js and ```toml block of the READMEs below carries
a marker, an HTML comment on the line before it (an unmarked one fails the test):

  <!-- doctest: run -->         run it; it must exit 0
  <!-- doctest: continue -->    run it together with the block before (same language):
                                one script, e.g. a snippet that uses the previous one's names
  <!-- doctest: background -->  a server (sh): started, waited for on $PORT, then stopped
                                with SIGTERM at the end of its README; it must exit, and
                                leave no process behind, within 10 s
  <!-- doctest: serve -->       a quotad (sh): like `background`, but waited for on its socket
                                (the config's with `--config`, else the default path), which
                                must be gone after SIGTERM; the test's own daemon on that
                                socket stops for the README (and restarts after it)
  <!-- doctest: config -->      toml: part of the config the README's `quotad serve
                                --config quotad.toml` runs with (README.md's blocks)
  <!-- doctest: fragment -->    an excerpt, not a whole program: not run
  <!-- doctest: skip: <why> --> not run, for the reason given (the test does it itself)

A block whose client warns that it cannot reach quotad (and so fails open)
fails. So does one that names a policy (`policy=`, `policy:`, `"policy":`,
`--policy`) that the daemon it talks to does not define: README.md's config
when the block names its socket or `--config`, or when $QUOTAD_SOCKET is that
socket; else the daemon without a config, whose only policy is `default`.
A sh block with `$ ` prompts is a transcript: each command's stdout must match
the lines under it, where `...` matches any text (numbers that vary).

The setting is a fresh copy of the repo (the files git knows, as in a clone),
with a project of the user's next to it:

  <tmp>/quotad    the copy; sh blocks start here, Python blocks run here
  <tmp>/my-app    an empty npm project (package.json only); JS blocks run here
  <tmp>/venv      a virtualenv, first on PATH (so the README's `pip install`
                  installs into it, from the copy, as a user would)

Two daemons run: `quotad serve` without a config at the default path
(XDG_RUNTIME_DIR is a private directory; restarted empty for each README),
and `quotad serve --config quotad.toml` with README.md's config, its Redis
being a redis-server of the test's own (README.md's `serve` blocks
start them in its place, as a user would). In every block, `/tmp/q/quotad.sock` (that config's socket) and
`redis://127.0.0.1:6379` become the test's own paths, and `localhost:3000`
and `localhost:8000` a free port ($PORT). `cargo run --release -- ARGS` and
`quotad ARGS` run $QUOTAD_BIN (a stand-in `cargo` on PATH: no release
build), and `target/release/quotad` is $QUOTAD_BIN too. `export NAME=value`
lines of a sh block stay set for the later blocks of its README, as in a
terminal.

Usage: QUOTAD_BIN=target/debug/quotad scripts/test-docs.py [README ...]
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
READMES = [
    "README.md",
    "clients/README.md",
    "clients/python/README.md",
    "clients/node/README.md",
    "examples/fastapi/README.md",
    "examples/express/README.md",
]
LANGS = {"sh": "sh", "bash": "sh", "shell": "sh", "python": "python", "py": "python",
         "js": "js", "javascript": "js", "toml": "toml"}
MARKER = re.compile(r"<!--\s*doctest:\s*(run|continue|background|serve|config|fragment|skip:\s*\S.*?)\s*-->")
BLOCK_TIMEOUT = 300  # s: a block may install packages from the registries
# A policy named in code: policy="api", policy: 'api', "policy": "api", --policy api.
POLICY_NAME = re.compile(r"""\bpolicy["']?\s*[:=]\s*["']([^"']+)["']|--policy[= ]["']?([^\s"']+)""")
BUILTIN_POLICIES = {"default"}  # `quotad serve` without a config


@dataclass
class Block:
    path: str
    line: int
    lang: str
    marker: str
    code: str

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


class Failure(Exception):
    pass


def parse(path: str) -> list[Block]:
    """The marked blocks of a README; raises on an unmarked one."""
    lines = (REPO / path).read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        start, lang = i, LANGS.get(fence.group(1), "")
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            i += 1
        code = "\n".join(lines[start + 1 : i]) + "\n"
        i += 1
        if not lang:
            continue
        before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        m = MARKER.fullmatch(before.strip())
        if not m:
            raise Failure(f"{path}:{start + 1}: a ```{fence.group(1)} block without a doctest marker "
                          "(see scripts/test-docs.py)")
        blocks.append(Block(path, start + 1, lang, m.group(1).split(":")[0], code))
    return blocks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, ready, timeout: float, alive=lambda: True) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if not alive():
            raise Failure(f"{what}: the process exited")
        if time.monotonic() > deadline:
            raise Failure(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def matches(expected: list[str], actual: list[str]) -> bool:
    if len(expected) != len(actual):
        return False
    for e, a in zip(expected, actual):
        pattern = ".*".join(re.escape(part) for part in e.rstrip().split("..."))
        if not re.fullmatch(pattern, a.rstrip()):
            return False
    return True


class World:
    """The fresh copy, the user's project, the virtualenv and the daemons."""

    def __init__(self, tmp: Path, quotad_bin: Path) -> None:
        self.tmp = tmp
        self.bin = quotad_bin
        self.copy = tmp / "quotad"
        self.app = tmp / "my-app"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.port = free_port()
        self._copy_repo()
        self.app.mkdir()
        (self.app / "package.json").write_text('{ "name": "my-app", "private": true, "type": "module" }\n')
        run_dir = tmp / "run"
        run_dir.mkdir(mode=0o700)
        tools = tmp / "bin"
        tools.mkdir()
        (tools / "quotad").symlink_to(quotad_bin)
        (tools / "cargo").write_text(
            "#!/bin/sh\n# Stands in for `cargo run [--release] -- ARGS`: runs the quotad under test.\n"
            'while [ $# -gt 0 ] && [ "$1" != "--" ]; do shift; done\n'
            '[ "$1" = "--" ] || { echo "stand-in cargo: only `cargo run [--release] -- ARGS`" >&2; exit 2; }\n'
            f'shift; exec "{quotad_bin}" "$@"\n'
        )
        (tools / "cargo").chmod(0o755)
        subprocess.run([sys.executable, "-m", "venv", str(tmp / "venv")], check=True)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTAD_")}
        self.env.update(
            PATH=f"{tmp / 'venv' / 'bin'}:{tools}:{os.environ['PATH']}",
            VIRTUAL_ENV=str(tmp / "venv"),
            XDG_RUNTIME_DIR=str(run_dir),
            PORT=str(self.port),
            PIP_DISABLE_PIP_VERSION_CHECK="1",
            npm_config_fund="false",
            npm_config_audit="false",
            npm_config_update_notifier="false",
        )
        self.env.pop("PYTHONPATH", None)
        self.redis_sock = tmp / "redis.sock"
        self.config_sock = tmp / "q.sock"
        self.builtin_sock = run_dir / "quotad.sock"
        self.builtin: subprocess.Popen[bytes] | None = None
        self.configured: subprocess.Popen[bytes] | None = None

    def _copy_repo(self) -> None:
        files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                               cwd=REPO, check=True, capture_output=True).stdout.split(b"\0")
        for name in filter(None, (f.decode() for f in files)):
            src = REPO / name
            if src.is_file():  # a file deleted in the worktree is not copied
                dst = self.copy / name
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
        release = self.copy / "target" / "release"
        release.mkdir(parents=True)
        (release / "quotad").symlink_to(self.bin)

    def substitute(self, text: str) -> str:
        return (text.replace("/tmp/q/quotad.sock", str(self.config_sock))
                .replace("redis://127.0.0.1:6379", f"redis+unix://{self.redis_sock}")
                .replace("localhost:3000", f"localhost:{self.port}")
                .replace("localhost:8000", f"localhost:{self.port}"))

    def start_daemons(self, config: str) -> None:
        self.procs.append(subprocess.Popen(
            ["redis-server", "--port", "0", "--unixsocket", str(self.redis_sock), "--save", "",
             "--appendonly", "no", "--dir", str(self.tmp)], stdout=subprocess.DEVNULL))
        wait_for("redis-server", self.redis_sock.exists, 10)
        self.policies = set(tomllib.loads(config).get("policies", {}))
        (self.copy / "quotad.toml").write_text(self.substitute(config))
        self.start_configured()

    def start_configured(self) -> None:
        self.configured = self._serve(["--config", "quotad.toml"], self.config_sock)

    def stop_configured(self) -> None:
        """Makes room on the config's socket for a README's own `quotad serve --config`."""
        self._stop(self.configured)
        self.configured = None

    def fresh_builtin(self, start: bool = True) -> None:
        """(Re)starts the daemon without a config: each README starts from an empty memory backend
        (or, with start=False, from the one its own `serve` block starts)."""
        self._stop(self.builtin)
        self.builtin = self._serve([], self.builtin_sock) if start else None

    def serve_socket(self, code: str) -> Path:
        """Where a README's `quotad serve` block listens."""
        return self.config_sock if "--config" in code else self.builtin_sock

    def _stop(self, proc: subprocess.Popen[bytes] | None) -> None:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
            self.procs.remove(proc)

    def _serve(self, args: list[str], sock: Path) -> subprocess.Popen[bytes]:
        log = open(self.tmp / "quotad.log", "ab")
        proc = subprocess.Popen([str(self.bin), "serve", *args], cwd=self.copy, env=self.env,
                                stdout=log, stderr=log)
        self.procs.append(proc)
        wait_for(f"quotad at {sock} (log: {self.tmp / 'quotad.log'})", sock.exists, 10,
                 lambda: proc.poll() is None)
        return proc

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


class Session:
    """The blocks of one README: its environment (exports) and servers."""

    def __init__(self, world: World, path: str) -> None:
        self.world = world
        self.path = path
        self.env = dict(world.env)
        # Each server, and the socket it listens on (None: $PORT).
        self.servers: list[tuple[Block, subprocess.Popen[bytes], Path, Path | None]] = []
        self.ran = 0

    def run(self, block: Block) -> None:
        self._check_policies(block)
        code = self.world.substitute(block.code)
        if block.lang == "sh" and block.marker == "background":
            self._background(block, code, None)
        elif block.lang == "sh" and block.marker == "serve":
            self._background(block, code, self.world.serve_socket(code))
        elif block.lang == "sh" and re.search(r"^\$ ", code, re.M):
            self._transcript(block, code)
        elif block.lang == "sh":
            self._check(block, ["bash", "-euo", "pipefail", "-c", code], self.world.copy)
            self.env.update(re.findall(r"^\s*export\s+(\w+)=(\S+)\s*$", code, re.M))
        elif block.lang == "python":
            script = self.world.tmp / f"block{block.line}.py"
            script.write_text(code)
            self._check(block, [str(self.world.tmp / "venv" / "bin" / "python"), str(script)], self.world.copy)
        elif block.lang == "js":
            script = self.world.app / f"block{block.line}.mjs"
            script.write_text(code)
            self._check(block, ["node", str(script)], self.world.app)
        else:
            raise Failure(f"{block.where}: cannot run a {block.lang} block")
        self.ran += 1

    def _check_policies(self, block: Block) -> None:
        """Fails on a policy the block names that the daemon it talks to does not define."""
        named = {a or b for a, b in POLICY_NAME.findall(block.code)}
        if ("/tmp/q/quotad.sock" in block.code or "--config" in block.code
                or self.env.get("QUOTAD_SOCKET") == str(self.world.config_sock)):
            defined, daemon = self.world.policies, "README.md's config (the `config` blocks)"
        else:
            defined, daemon = BUILTIN_POLICIES, "`quotad serve` without a config"
        if undefined := sorted(named - defined):
            raise Failure(f"{block.where}: {', '.join(f'`{n}`' for n in undefined)}: no such policy in "
                          f"{daemon}, which this block talks to; it defines "
                          + ", ".join(f"`{p}`" for p in sorted(defined)))

    def _check(self, block: Block, argv: list[str], cwd: Path) -> str:
        try:
            out = subprocess.run(argv, cwd=cwd, env=self.env, capture_output=True, timeout=BLOCK_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise Failure(f"{block.where}: still running after {BLOCK_TIMEOUT} s") from None
        text = (out.stdout + out.stderr).decode(errors="replace")
        if out.returncode != 0:
            raise Failure(f"{block.where}: exited {out.returncode}\n--- block:\n{block.code}--- output:\n{text}")
        # The clients fail open, silently but for this warning: a block must reach its daemon.
        if re.search(r"cannot reach quotad|quotad connection lost", text):
            raise Failure(f"{block.where}: reached no quotad\n--- output:\n{text}")
        return text

    def _transcript(self, block: Block, code: str) -> None:
        steps: list[tuple[str, list[str]]] = []
        for line in code.splitlines():
            if line.startswith("$ "):
                steps.append((line[2:], []))
            elif steps:
                steps[-1][1].append(line)
            elif line.strip():
                raise Failure(f"{block.where}: a transcript starts with `$ `")
        for command, expected in steps:
            try:
                out = subprocess.run(["bash", "-c", command], cwd=self.world.copy, env=self.env,
                                     capture_output=True, timeout=BLOCK_TIMEOUT)
            except subprocess.TimeoutExpired:
                raise Failure(f"{block.where}: `{command}` still running after {BLOCK_TIMEOUT} s") from None
            actual = out.stdout.decode(errors="replace").rstrip("\n").splitlines()
            want = list(expected)
            while want and not want[-1].strip():
                want.pop()
            if not matches(want, actual):
                raise Failure(f"{block.where}: `{command}` printed\n" + "\n".join(actual)
                              + "\n--- expected:\n" + "\n".join(want)
                              + "\n--- stderr:\n" + out.stderr.decode(errors="replace"))

    def _background(self, block: Block, code: str, sock: Path | None) -> None:
        log = self.world.tmp / f"server{block.line}.log"
        proc = subprocess.Popen(["bash", "-c", code], cwd=self.world.copy, env=self.env,
                                stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        self.servers.append((block, proc, log, sock))
        port = self.world.port
        try:
            if sock is None:
                wait_for(f"{block.where} to listen on port {port}", lambda: listening(port),
                         BLOCK_TIMEOUT, lambda: proc.poll() is None)
            else:
                wait_for(f"{block.where} to listen on {sock}", sock.exists, BLOCK_TIMEOUT,
                         lambda: proc.poll() is None)
        except Failure as e:
            raise Failure(f"{e}\n--- output:\n{log.read_text(errors='replace')}") from None

    def close(self) -> None:
        """Stops the README's servers as Ctrl-C would (the whole process group), with SIGTERM."""
        for block, proc, log, sock in self.servers:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and _group_alive(proc):
                time.sleep(0.05)
            if _group_alive(proc):
                os.killpg(proc.pid, signal.SIGKILL)
                raise Failure(f"{block.where}: a process was still running 10 s after SIGTERM\n"
                              f"--- output:\n{log.read_text(errors='replace')}")
            if sock is None and listening(self.world.port):
                raise Failure(f"{block.where}: port {self.world.port} still listens after SIGTERM")
            if sock is not None and sock.exists():
                raise Failure(f"{block.where}: {sock} is still there after SIGTERM")
        self.servers.clear()


def _group_alive(proc: subprocess.Popen[bytes]) -> bool:
    proc.poll()  # reap the leader
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return False
    # Zombies count as gone.
    ps = subprocess.run(["ps", "-o", "stat=", "-g", str(proc.pid)], capture_output=True, text=True).stdout
    return any(s and not s.startswith("Z") for s in ps.split())


def main() -> int:
    quotad_bin = Path(os.environ.get("QUOTAD_BIN", REPO / "target" / "debug" / "quotad")).resolve()
    if not quotad_bin.is_file():
        print(f"test-docs: no quotad at {quotad_bin}: build it (cargo build) or set QUOTAD_BIN", file=sys.stderr)
        return 2
    paths = sys.argv[1:] or READMES
    started = time.monotonic()
    try:
        readmes = {p: parse(p) for p in READMES}
    except Failure as e:
        print(f"test-docs: FAIL {e}", file=sys.stderr)
        return 1
    config = "".join(b.code for b in readmes["README.md"] if b.marker == "config")
    failed = total = 0
    with tempfile.TemporaryDirectory(prefix="quotad-docs-") as tmp:
        world = World(Path(tmp), quotad_bin)
        try:
            world.start_daemons(config)
            for path in paths:
                session = Session(world, path)
                units: list[Block] = []
                for b in readmes[path]:
                    if b.marker == "continue":
                        if not units or units[-1].lang != b.lang:
                            raise Failure(f"{b.where}: `continue` follows no {b.lang} block")
                        units[-1].code += b.code
                    elif b.marker in ("run", "background", "serve"):
                        units.append(Block(b.path, b.line, b.lang, b.marker, b.code))
                # A README's own `quotad serve` takes the socket of the test's daemon.
                served = {world.serve_socket(u.code) for u in units if u.marker == "serve"}
                world.fresh_builtin(start=world.builtin_sock not in served)
                if world.config_sock in served:
                    world.stop_configured()
                t = time.monotonic()
                try:
                    for unit in units:
                        session.run(unit)
                finally:
                    total += session.ran
                    try:
                        session.close()
                    except Failure as e:
                        print(f"test-docs: FAIL {e}", file=sys.stderr)
                        failed += 1
                    if world.configured is None:
                        world.start_configured()
                print(f"test-docs: {path}: {session.ran} blocks ok ({time.monotonic() - t:.1f} s)")
        except Failure as e:
            print(f"test-docs: FAIL {e}", file=sys.stderr)
            failed += 1
        finally:
            world.stop()
    status = "FAILED" if failed else "ok"
    print(f"test-docs: {status}: {total} blocks ran in {time.monotonic() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
