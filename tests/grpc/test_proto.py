"""The generated gRPC code is what `make proto` makes of inference.proto, and the messages are the protocol's."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor
from tritonclient.grpc import service_pb2 as triton_pb

from tests.processes import REPO

GENERATED = [f"{name}{suffix}" for name in ("inference_pb2", "inference_pb2_grpc", "health_pb2", "health_pb2_grpc")
             for suffix in (".py", ".pyi")]  # fmt: skip
PROTO = Path("src/asyncserve/grpc/inference.proto")
HEALTH_PROTO = Path("src/asyncserve/grpc/health.proto")


async def protoc(*outputs: str, protos: tuple[Path, ...] = (PROTO,)) -> None:
    """grpc_tools' protoc on ``protos``, as `make proto` runs it, with the plugins of this environment."""
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "grpc_tools.protoc", "-I", "src", *outputs, *map(str, protos),
        cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()


async def test_regenerating_changes_nothing(tmp_path: Path) -> None:
    out = str(tmp_path)
    outputs = (f"--python_out={out}", f"--grpc_python_out={out}", f"--mypy_out={out}", f"--mypy_grpc_out={out}")
    await protoc(*outputs, protos=(PROTO, HEALTH_PROTO))
    for name in GENERATED:
        made = await asyncio.to_thread((tmp_path / "asyncserve/grpc" / name).read_bytes)
        kept = await asyncio.to_thread((REPO / "src/asyncserve/grpc" / name).read_bytes)
        assert made == kept, f"src/asyncserve/grpc/{name} differs from what inference.proto makes: run make proto"


def fields(message: descriptor_pb2.DescriptorProto, prefix: str = "") -> dict[str, tuple[int, int, bool]]:
    found: dict[str, tuple[int, int, bool]] = {
        f"{prefix}{message.name}.{f.name}": (f.number, int(f.type), f.label == f.LABEL_REPEATED) for f in message.field
    }
    for nested in message.nested_type:
        if not nested.options.map_entry:
            found |= fields(nested, f"{prefix}{message.name}.")
    return found


def triton_fields(message: Descriptor, prefix: str = "") -> dict[str, tuple[int, int, bool]]:
    proto = descriptor_pb2.DescriptorProto()
    message.CopyToProto(proto)
    return fields(proto, prefix)


async def test_every_message_and_call_is_the_protocols(tmp_path: Path) -> None:
    """Compared with tritonclient's own definition, field by field: number, type and repetition."""
    descriptor_set = tmp_path / "inference.pb"
    await protoc(f"--descriptor_set_out={descriptor_set}")
    ours = descriptor_pb2.FileDescriptorSet.FromString(await asyncio.to_thread(descriptor_set.read_bytes)).file[0]
    assert ours.package == triton_pb.DESCRIPTOR.package == "inference"
    theirs = triton_pb.DESCRIPTOR.message_types_by_name
    for message in ours.message_type:
        assert fields(message) == triton_fields(theirs[message.name]), message.name
    service = triton_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in ours.service[0].method:
        upstream = service.methods_by_name[method.name]
        assert (method.input_type, method.output_type) == (
            f".{upstream.input_type.full_name}",
            f".{upstream.output_type.full_name}",
        )
        assert method.client_streaming == upstream.client_streaming
        assert method.server_streaming == upstream.server_streaming
    assert (len(ours.message_type), len(ours.service[0].method)) == (22, 10)
