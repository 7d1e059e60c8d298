"""The ssh tunnel command a laptop runs to reach a server on a compute node, hop by hop.

Every hop names its user: with `-J login node` OpenSSH logs in to the node as the *laptop's* user name, which is
rarely the cluster's. A key (NERSC's sshproxy key, ~/.ssh/nersc) must reach every hop too, and `-J` gives `-i` to
the last hop only (its jump ssh is started without it), so with a key the jump is an explicit ProxyCommand.
Standard library only: `clip-hpc check-ports` uses it on the laptop.
"""

from __future__ import annotations

import os
import shlex
from typing import NamedTuple

SSH_KEY_ENV = "CLIP_HPC_SSH_KEY"  # the profile's key for every hop (Perlmutter: ~/.ssh/nersc from sshproxy)


class Hop(NamedTuple):
    """One ssh hop, `[user@]host[:port]` as a profile writes it."""

    user: str | None
    host: str
    port: int | None = None

    @classmethod
    def parse(cls, spec: str) -> Hop:
        user, _, host = spec.rpartition("@")
        name, sep, port = host.rpartition(":")
        if sep and port.isdigit() and name and not name.endswith(":"):  # not an IPv6 literal's last group
            return cls(user or None, name, int(port))
        return cls(user or None, host)

    def target(self) -> str:
        """`user@host`, as ssh takes its destination (the port goes to -p)."""
        return f"{self.user}@{self.host}" if self.user else self.host

    def jump(self) -> str:
        """`user@host[:port]`, as -J takes it."""
        return self.target() + (f":{self.port}" if self.port else "")

    def on(self, host: str) -> Hop:
        """The next hop, as the same user (the cluster's accounts are the same on its login and compute nodes)."""
        return Hop(self.user, host)


def key_path(key: str | None = None) -> str | None:
    """The key for every hop: given, else $CLIP_HPC_SSH_KEY, else None (ssh's own defaults)."""
    return key or os.environ.get(SSH_KEY_ENV) or None


def quote_path(path: str) -> str:
    """Quoted for a shell, but a leading ~/ stays outside the quotes so that the laptop's shell expands it."""
    if path.startswith("~/"):
        return "~/" + shlex.quote(path[2:])
    return shlex.quote(path)


def ssh_words(hop: Hop, key: str | None) -> list[str]:
    """The options that log in to `hop` itself: its key and port (already quoted for a shell)."""
    return [*(["-i", quote_path(key)] if key else []), *(["-p", str(hop.port)] if hop.port else [])]


def via_login(login: Hop, node: Hop, key: str | None) -> list[str]:
    """The words that reach `node` through `login` (quoted for a shell): -J without a key, else a ProxyCommand
    that gives the jump ssh the key too."""
    if key is None:
        return ["-J", login.jump(), *ssh_words(node, None), node.target()]
    proxy = " ".join(["ssh", *ssh_words(login, key), "-W", "%h:%p", login.target()])
    return [*ssh_words(node, key), "-o", shlex.quote(f"ProxyCommand={proxy}"), node.target()]


def tunnel_command(forward: str, login_spec: str, node: str | None, key: str | None = None) -> str:
    """`ssh -N -L FORWARD ...` that ends on `node` through the login node, or on the login node when `node` is
    None (a server bound to the node's network interface, forwarded by the login node); FORWARD is quoted here."""
    login = Hop.parse(login_spec)
    key = key_path(key)
    if node is None:
        route = [*ssh_words(login, key), login.target()]
    else:
        route = via_login(login, login.on(node), key)
    return " ".join(["ssh", "-N", "-L", shlex.quote(forward), *route])


def hop_checks(login_spec: str, node: str | None, key: str | None = None) -> list[str]:
    """One `ssh ... true` per hop, in order, to find which hop of a tunnel fails (MFA, user name, key, job gone)."""
    login = Hop.parse(login_spec)
    key = key_path(key)
    checks = [f"hop 1 laptop -> {login.host}: " + " ".join(["ssh", *ssh_words(login, key), login.target(), "true"])]
    if node is not None:
        words = via_login(login, login.on(node), key)
        checks.append(f"hop 2 {login.host} -> {node}: " + " ".join(["ssh", *words, "true"]))
    return checks


def _option(words: list[str], flag: str) -> str | None:
    return words[words.index(flag) + 1] if flag in words[:-1] else None


def hop_checks_for(command: str) -> list[str]:
    """`hop_checks` for a tunnel command made by `tunnel_command` (the connection file keeps only the command);
    [] for a command of another shape."""
    try:
        words = shlex.split(command)
    except ValueError:
        return []
    if len(words) < 2 or words[0] != "ssh":
        return []
    key, jump, port = _option(words, "-i"), _option(words, "-J"), _option(words, "-p")
    proxy = next((w.split("=", 1)[1] for w in words if w.startswith("ProxyCommand=")), None)
    if jump is not None:
        return hop_checks(jump, Hop.parse(words[-1]).host, key)
    if proxy is not None:
        inner = shlex.split(proxy)
        return hop_checks(_with_port(inner[-1], _option(inner, "-p")), Hop.parse(words[-1]).host, key)
    return hop_checks(_with_port(words[-1], port), None, key)


def _with_port(target: str, port: str | None) -> str:
    hop = Hop.parse(target)
    return hop._replace(port=int(port)).jump() if port and port.isdigit() else hop.jump()
