"""Regenerate the Python stubs beside the .proto: `python protos/generate.py [OUT_DIR]`.

protoc's virtual include path maps protos/florence2/v1 to florence2_serve/v1, so the generated
`*_pb2_grpc.py` imports `florence2_serve.v1.florence2_pb2` through the installed namespace.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent / "florence2" / "v1"
GENERATED = ("florence2_pb2.py", "florence2_pb2.pyi", "florence2_pb2_grpc.py")


def googleapis_protos() -> Path:
    """The folder holding google/api/*.proto and google/rpc/*.proto as googleapis-common-protos installs them
    (the google.api.http annotations' source, a dependency of the package)."""
    import google.api.annotations_pb2 as annotations

    return Path(annotations.__file__).resolve().parent.parent.parent


def generate(out_dir: Path) -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc", f"-Iflorence2_serve/v1={PROTO_DIR}", f"-I{well_known}", f"-I{googleapis_protos()}",
            f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}",
            str(PROTO_DIR / "florence2.proto"),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name in GENERATED:
            target = out_dir / name
            shutil.copy(Path(tmp) / "florence2_serve" / "v1" / name, target)
            written.append(target)
        return written


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_DIR):
        print(path)
