"""Tests for the local server helpers: Valkey with AOF survives kill/restart, SeaweedFS S3 works.

Both servers are real processes on 127.0.0.1; each test stops what it starts.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis
from minio.error import S3Error

from tests.helpers import wait_for
from tests.servers import (
    GRPC_PORT_OFFSET,
    MAX_PORT_WITH_GRPC,
    RedisServer,
    SeaweedS3Server,
    free_ports,
    port_is_open,
    valkey_binary,
)

logger = logging.getLogger(__name__)

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
ACCESS_ERRORS = {"AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId"}


def _listening_addresses(pid: int) -> set[tuple[str, int]]:
    """(ip, port) of every TCP socket in LISTEN state held open by process ``pid``."""
    return {(c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN}


needs_proc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="lists a process's sockets")


def test_free_ports_are_distinct_and_leave_room_for_grpc() -> None:
    ports = free_ports(8)
    assert len(set(ports)) == 8
    assert all(0 < p < MAX_PORT_WITH_GRPC for p in ports)
    assert not set(ports) & {p + GRPC_PORT_OFFSET for p in ports}


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(data_dir=tmp_path / "valkey", appendonly=True)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@needs_proc
def _aof_settled(info: dict) -> bool:
    return info["aof_enabled"] == 1 and info["aof_buffer_length"] == 0 and info["aof_pending_bio_fsync"] == 0 \
        and info["aof_current_size"] > 0


def test_redis_aof_survives_kill_and_restart(redis_server: RedisServer) -> None:
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert redis_server.binary == valkey_binary()
    assert redis_server.pid is not None
    assert _listening_addresses(redis_server.pid) == {("127.0.0.1", redis_server.port)}

    client = redis.Redis.from_url(redis_server.url)
    try:
        client.rpush("queue", "job-1", "job-2")
        client.set("key", "value")
        # appendfsync everysec promises at most about a second of acknowledged writes lost: while
        # the previous second's fsync is still running (a busy disk), valkey postpones the AOF
        # write() for up to 2 s and replies anyway. What survives a SIGKILL is what it wrote, so
        # the kill waits until the server reports an empty AOF buffer and no fsync pending.
        wait_for(lambda: _aof_settled(client.info("persistence")), timeout=30, every=0.05)
    finally:
        client.close()

    redis_server.kill()
    assert not redis_server.running
    assert not port_is_open(redis_server.port)

    redis_server.restart()
    client = redis.Redis.from_url(redis_server.url)
    try:
        assert client.get("key") == b"value"
        assert client.lrange("queue", 0, -1) == [b"job-1", b"job-2"]
    finally:
        client.close()


def test_redis_password(tmp_path: Path) -> None:
    server = RedisServer(data_dir=tmp_path / "valkey-auth", password="s3cret/pw")
    try:
        server.start()
        assert server.url == f"redis://:s3cret%2Fpw@127.0.0.1:{server.port}/0"
        assert "s3cret" not in repr(server)
        client = redis.Redis.from_url(server.url)
        try:
            assert client.ping()
        finally:
            client.close()
        # Without AUTH the server refuses (raw socket: redis-py would retry with backoff).
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            assert sock.recv(4096).startswith(b"-NOAUTH")
    finally:
        server.stop()
    assert not port_is_open(server.port)


@pytest.fixture
def s3_server(tmp_path: Path) -> Iterator[SeaweedS3Server]:
    server = SeaweedS3Server(tmp_path / "seaweed")
    try:
        server.start()
        logger.info("weed mini ready after %.2fs", server.last_startup_seconds)
        yield server
    finally:
        server.stop()


@needs_proc
def test_seaweed_s3_roundtrip_auth_restart(s3_server: SeaweedS3Server) -> None:
    assert s3_server.pid is not None
    listening = _listening_addresses(s3_server.pid)
    assert listening, "weed mini listens on nothing?"
    assert {ip for ip, _ in listening} == {"127.0.0.1"}, listening
    assert {port for _, port in listening} <= set(s3_server.ports), listening

    bucket = "qpipe-test"
    s3_server.make_bucket(bucket)
    client = s3_server.client()
    data = os.urandom(12 * MiB)
    client.put_object(
        bucket,
        "blob.bin",
        io.BytesIO(data),
        len(data),
        part_size=5 * MiB,  # multipart
    )
    response = client.get_object(bucket, "blob.bin")
    try:
        assert response.read() == data
    finally:
        response.close()
        response.release_conn()

    wrong_secret = "definitely-not-the-secret-" + s3_server.secret_key[:4]
    bad = s3_server.client(secret_key=wrong_secret)
    with pytest.raises(S3Error):
        bad.stat_object(bucket, "blob.bin")
    # HEAD responses carry no error body, so check the code on a request that has one:
    with pytest.raises(S3Error) as excinfo:
        bad.list_buckets()
    assert excinfo.value.code in ACCESS_ERRORS
    assert wrong_secret not in str(excinfo.value)
    assert s3_server.secret_key not in str(excinfo.value)

    unknown = s3_server.client(access_key="NOSUCHKEY0000000", secret_key=wrong_secret)
    with pytest.raises(S3Error) as excinfo:
        unknown.list_buckets()
    assert excinfo.value.code in ACCESS_ERRORS

    anonymous = s3_server.client(access_key=None, secret_key=None)
    with pytest.raises(S3Error) as excinfo:
        anonymous.list_buckets()
    assert excinfo.value.code in ACCESS_ERRORS

    # Data survives a hard kill and a restart on the same port and directory.
    endpoint = s3_server.endpoint
    s3_server.kill()
    assert not port_is_open(s3_server.s3_port)
    s3_server.restart()
    assert s3_server.endpoint == endpoint
    assert client.stat_object(bucket, "blob.bin").size == len(data)

    s3_server.stop()
    assert not s3_server.running
    for port in s3_server.ports:
        assert not port_is_open(port), port
