"""Shared by server.py and client.py: compiles tests/proto/test.proto at start-up and the channel
and server options both sides use. Not a CLI.

The generated modules are never committed: protoc writes them to a temporary directory, they are
imported from there and the directory is removed again.
"""

import importlib
import os
import shutil
import sys
import tempfile

from grpc_tools import protoc

PROTO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "proto")
PROTO_FILE = "test.proto"

# 16 MiB both ways, so that the 4 MiB cases fit with room to spare (grpcio's default receive
# limit is 4 MiB, which a 4 MiB payload plus its framing would exceed).
MAX_MESSAGE = 16 * 1024 * 1024
MESSAGE_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
]


def load():
    """Returns the (test_pb2, test_pb2_grpc) modules generated from test.proto."""
    return generate(PROTO_DIR, PROTO_FILE, "test")


def generate(proto_dir, proto_file, module):
    """Compiles proto_file (relative to proto_dir) and returns the generated (module_pb2,
    module_pb2_grpc), `module` being the file's path without .proto, dotted ("agent.v1.status").
    Also used by tests/peers/api/client.py."""
    out = tempfile.mkdtemp(prefix="grpcpy-stubs-")
    try:
        # grpc_tools ships the well-known protos; protoc needs them on its include path only if the
        # file imports one, but passing the directory costs nothing and keeps that working.
        well_known = os.path.join(os.path.dirname(protoc.__file__), "_proto")
        rc = protoc.main([
            "grpc_tools.protoc",
            "-I" + os.path.abspath(proto_dir),
            "-I" + well_known,
            "--python_out=" + out,
            "--grpc_python_out=" + out,
            proto_file,
        ])
        if rc != 0:
            raise RuntimeError("protoc failed on %s (exit %d)" % (proto_file, rc))
        sys.path.insert(0, out)
        try:
            pb2 = importlib.import_module(module + "_pb2")
            pb2_grpc = importlib.import_module(module + "_pb2_grpc")
        finally:
            sys.path.remove(out)
        return pb2, pb2_grpc
    finally:
        shutil.rmtree(out, ignore_errors=True)


def pattern(seq, size):
    """Payload of message seq in the generated streams: byte i is (seq + i) % 256."""
    start = seq % 256
    block = bytes(range(256))
    rotated = block[start:] + block[:start]
    reps = size // 256 + 1
    return (rotated * reps)[:size]
