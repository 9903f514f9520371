"""Server reflection v1 (`grpc.reflection.v1.ServerReflection`) beside grpcio-reflection's v1alpha.

grpcio-reflection serves only v1alpha; current grpcurl, Postman and buf curl ask for v1 first. The
v1 protocol is v1alpha under a new package name with the same messages, field for field, so the
same servicer answers both: its messages are the v1alpha classes, which are byte-identical on the
wire. The v1 file descriptor (the v1alpha one renamed) goes into the default pool, so reflection
can describe the v1 service too.
"""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha

PACKAGE = "grpc.reflection.v1"
SERVICE_NAME = f"{PACKAGE}.ServerReflection"
FILE_NAME = "grpc/reflection/v1/reflection.proto"


def _register_descriptor() -> None:
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(FILE_NAME)
        return
    except KeyError:
        pass
    source = descriptor_pb2.FileDescriptorProto()
    v1alpha.DESCRIPTOR.CopyToProto(source)
    old = f".{source.package}."
    source.name, source.package = FILE_NAME, PACKAGE
    for message in source.message_type:
        for field in message.field:
            if field.type_name.startswith(old):
                field.type_name = f".{PACKAGE}." + field.type_name[len(old):]
    for service in source.service:
        for method in service.method:
            method.input_type = f".{PACKAGE}." + method.input_type[len(old):]
            method.output_type = f".{PACKAGE}." + method.output_type[len(old):]
    pool.AddSerializedFile(source.SerializeToString())


def enable(server: grpc.aio.Server, service_names: tuple[str, ...]) -> None:
    """Serve reflection v1 on `server` for `service_names` (which should include SERVICE_NAME)."""
    _register_descriptor()
    servicer = reflection.aio.ReflectionServicer(service_names)
    handler = grpc.method_handlers_generic_handler(SERVICE_NAME, {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=v1alpha.ServerReflectionRequest.FromString,
            response_serializer=v1alpha.ServerReflectionResponse.SerializeToString,
        ),
    })
    server.add_generic_rpc_handlers((handler,))
