"""docs/reference/grpc.md: every service, method, message and enum of the gRPC API with the
comments of the .proto files, from protoc's descriptors (grpc_tools, a dev dependency)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2

from backpropagate.reference.markdown import cell, generated_header, table

PROTO_ROOT = Path(__file__).resolve().parents[3] / "proto"
PACKAGE = Path("backpropagate_api") / "v1"
INTRO = """The API the CLI, the SDK and every other client speak: four services, each with the
standard gRPC health and reflection services beside it. A failed call carries its
`BackpropagateError` code in the status details (docs/reference/errors.md). Streams are marked
`stream`.

"""
LABELS = {
    descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED: "repeated ",
    descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL: "",
}


def descriptors() -> descriptor_pb2.FileDescriptorSet:
    """Our .proto files as protoc parses them, comments included."""
    from grpc_tools import protoc

    well_known = Path(protoc.__file__).parent / "_proto"
    files = sorted((PROTO_ROOT / PACKAGE).glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "api.pb"
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            *[str(path.relative_to(PROTO_ROOT)) for path in files],
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _comments(proto: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    """Each element's comment (leading, else trailing) by its path in the file descriptor."""
    return {
        tuple(location.path): " ".join(
            (location.leading_comments or location.trailing_comments).split()
        )
        for location in proto.source_code_info.location
        if location.leading_comments or location.trailing_comments
    }


def _type(
    field: descriptor_pb2.FieldDescriptorProto, maps: dict[str, descriptor_pb2.DescriptorProto]
) -> str:
    """The field's type as the .proto file writes it: `repeated Foo`, `map<string, string>`."""
    name = field.type_name.rsplit(".", 1)[-1] if field.type_name else ""
    if name in maps:
        key, value = maps[name].field
        return f"map<{_type(key, {})}, {_type(value, {})}>"
    kind = descriptor_pb2.FieldDescriptorProto.Type.Name(field.type)
    label = LABELS.get(field.label, "")
    optional = "optional " if field.proto3_optional else ""
    return f"{optional}{label}{name or kind.removeprefix('TYPE_').lower()}"


def _file_section(proto: descriptor_pb2.FileDescriptorProto) -> str:
    comments = _comments(proto)
    text = f"## `{Path(proto.name).name}`\n\n"
    for s, service in enumerate(proto.service):
        text += f"### service `{service.name}`\n\n{comments.get((6, s), '')}\n\n"
        methods = [
            (
                f"`{method.name}`",
                ("stream " if method.client_streaming else "") + method.input_type.split(".")[-1],
                ("stream " if method.server_streaming else "") + method.output_type.split(".")[-1],
                comments.get((6, s, 2, m), ""),
            )
            for m, method in enumerate(service.method)
        ]
        text += table(["method", "request", "response", "what"], methods) + "\n"
    for m, message in enumerate(proto.message_type):
        text += f"### message `{message.name}`\n\n"
        if (4, m) in comments:
            text += f"{cell(comments[(4, m)])}\n\n"
        maps = {nested.name: nested for nested in message.nested_type if nested.options.map_entry}
        fields = [
            (
                f"`{field.name}`",
                f"`{_type(field, maps)}`",
                field.number,
                comments.get((4, m, 2, f), ""),
            )
            for f, field in enumerate(message.field)
        ]
        text += table(["field", "type", "number", "what"], fields) if fields else "(no fields)\n"
        text += "\n"
    for e, enum in enumerate(proto.enum_type):
        text += f"### enum `{enum.name}`\n\n"
        values = [
            (f"`{value.name}`", value.number, comments.get((5, e, 2, v), ""))
            for v, value in enumerate(enum.value)
        ]
        text += table(["value", "number", "what"], values) + "\n"
    return text


def grpc_page() -> str:
    text = generated_header("gRPC API reference", "the .proto files, proto/backpropagate_api/v1")
    sections = "".join(_file_section(proto) for proto in descriptors().file)
    return text + INTRO + sections.rstrip() + "\n"
