"""The controller's gRPC endpoint seen by a real reflection client (Python grpcio).

Starts the real switchyard-controller binary on the example manifests, resolves every
type through server reflection (as grpcurl does) and calls the query API with messages
built from those descriptors; nothing here is generated from switchyard's .proto files.
"""

import os
import re
import subprocess
import time

import grpc
import pytest
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

CONTROLLER = os.environ.get("SWITCHYARD_CONTROLLER")
EXAMPLES = os.environ.get("SWITCHYARD_EXAMPLES")


@pytest.fixture(scope="module")
def address():
    if not CONTROLLER or not os.access(CONTROLLER, os.X_OK):
        pytest.fail("SWITCHYARD_CONTROLLER must name the built controller binary (scripts/test.sh sets it)")
    proc = subprocess.Popen(
        [CONTROLLER, "--manifests", EXAMPLES, "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        addr = None
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            m = re.search(r"serving on ([0-9.]+:[0-9]+)", line)
            if m:
                addr = m.group(1)
                break
        if addr is None:
            pytest.fail("controller did not report its address")
        yield addr
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class Reflected:
    """Calls methods by full name with messages built from reflected descriptors."""

    def __init__(self, channel):
        self.channel = channel
        self.db = ProtoReflectionDescriptorDatabase(channel)
        self.pool = descriptor_pool.DescriptorPool(self.db)

    def call(self, service, method, request_json="{}"):
        svc = self.pool.FindServiceByName(service)
        m = svc.FindMethodByName(method)
        req_cls = message_factory.GetMessageClass(m.input_type)
        resp_cls = message_factory.GetMessageClass(m.output_type)
        request = json_format.Parse(request_json, req_cls())
        rpc = self.channel.unary_unary(
            f"/{service}/{method}",
            request_serializer=req_cls.SerializeToString,
            response_deserializer=resp_cls.FromString,
        )
        return json_format.MessageToDict(rpc(request, timeout=10))


@pytest.fixture(scope="module")
def reflected(address):
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        yield Reflected(channel)


def wait_for(check, what, seconds=10):
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_reflection_v1alpha_lists_switchyard_services(reflected):
    services = set(reflected.db.get_services())
    assert {"switchyard.v1.ControllerQuery", "switchyard.v1.NodeStateDiscovery", "grpc.health.v1.Health"} <= services


def test_reflection_v1_answers_as_well(address):
    # v1 and v1alpha messages are identical on the wire; only the method path differs.
    with grpc.insecure_channel(address) as channel:
        rpc = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (response,) = list(rpc(iter([request]), timeout=10))
        names = {s.name for s in response.list_services_response.service}
        assert "switchyard.v1.ControllerQuery" in names


def test_list_nodes_shows_the_example_nodes(reflected):
    def nodes():
        found = reflected.call("switchyard.v1.ControllerQuery", "ListNodes").get("nodes", [])
        return found if len(found) >= 3 else None

    nodes = wait_for(nodes, "the example nodes")
    names = [n["nodeName"] for n in nodes]
    assert {"node-a", "node-b", "node-c"} <= set(names)
    for n in nodes:
        assert n["inCluster"] is True
        assert int(n.get("services", 0)) > 0
        assert len(n["desiredVersion"]) == 16


def test_node_state_holds_resources_with_content_versions(reflected):
    state = reflected.call("switchyard.v1.ControllerQuery", "GetNodeState", '{"node_name": "node-a"}')
    resources = state["resources"]
    assert resources, "node-a must program some Services"
    names = [r["name"] for r in resources]
    assert names == sorted(names)
    for r in resources:
        assert re.fullmatch(r"[0-9a-f]{16}", r["version"])
        assert r["service"]["namespace"] + "/" + r["service"]["name"] == r["name"]


def test_unknown_node_is_not_found(reflected):
    with pytest.raises(grpc.RpcError) as err:
        reflected.call("switchyard.v1.ControllerQuery", "GetNodeState", '{"node_name": "no-such-node"}')
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_examples_have_no_source_problems(reflected):
    problems = reflected.call("switchyard.v1.ControllerQuery", "ListSourceProblems").get("problems", [])
    assert problems == []


def test_health_reports_serving(reflected):
    status = reflected.call("grpc.health.v1.Health", "Check", '{"service": "switchyard.v1.ControllerQuery"}')
    assert status["status"] == "SERVING"
