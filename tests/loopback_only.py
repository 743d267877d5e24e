"""Run a command in a new network namespace whose only interface is the loopback, brought up.

    python tests/loopback_only.py COMMAND [ARG...]

Nothing the command (or anything it starts) does can reach another machine: there is no route
out, only 127.0.0.1. Needs root (CAP_SYS_ADMIN), like `unshare -n`; `ip` is not needed, the
loopback is brought up with the SIOCSIFFLAGS ioctl. Exits 3 with one line when it cannot.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct
import sys

CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
IFREQ = "16sh14s"  # struct ifreq: the name, then ifr_flags, padded


def loopback_only() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), f"unshare(CLONE_NEWNET): {os.strerror(ctypes.get_errno())}")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        flags = struct.unpack(IFREQ, fcntl.ioctl(probe, SIOCGIFFLAGS, struct.pack(IFREQ, b"lo", 0, b"")))[1]
        fcntl.ioctl(probe, SIOCSIFFLAGS, struct.pack(IFREQ, b"lo", flags | IFF_UP, b""))


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python tests/loopback_only.py COMMAND [ARG...]")
    try:
        loopback_only()
    except OSError as exc:
        sys.stderr.write(f"loopback_only: cannot make a network namespace ({exc}); run as root\n")
        sys.exit(3)
    os.execvp(sys.argv[1], sys.argv[1:])


if __name__ == "__main__":
    main()
