"""Shard folders in object storage: served on 127.0.0.1 by `tests.object_server` (ranged GETs, with faults) and by
moto's S3 server, read by byte ranges, every sample exactly once through the real trainer."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest

from tests.data.shard_fixtures import make_loader, write_shards
from tests.object_server import ObjectServer
from vlm.config import load_config
from vlm.data.reader import ShardReader
from vlm.data.remote import RemoteSettings
from vlm.data.sources import SourceError, resolve_sources
from vlm.formats import manifest as mf
from vlm.formats.errors import BadSample
from vlm.tokenizer import load_tokenizer
from vlm.train.cli import main
from vlm.train.preflight import OK, PROBLEM, Report, check_batch

FAST = RemoteSettings(timeout_s=2.0, retries=8, backoff_s=0.01)  # tests wait milliseconds between tries
COUNTS = [7, 12, 5, 9]  # 33 samples in 4 uneven shards
BUCKET = "bucket-one"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """The served root: one shard folder at BUCKET/sft (the bucket doubles as a path for http)."""
    root = tmp_path_factory.mktemp("objects")
    write_shards(root / BUCKET / "sft", COUNTS, prefix="r", images_of=lambda i: i % 2)
    return root


@pytest.fixture(scope="module")
def local(root) -> list:
    """Every sample as read from the local folder: what a remote read must give."""
    reader = ShardReader(resolve_sources([str(root / BUCKET / "sft")]).shards)
    return [reader.read(i) for i in range(len(reader))]


@pytest.fixture
def s3_env(monkeypatch):
    """boto3 pointed at a local endpoint by the standard variables (set `AWS_ENDPOINT_URL` in the test)."""
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return monkeypatch


def remote_reader(spec: str, settings: RemoteSettings = FAST, **kw) -> ShardReader:
    return ShardReader(resolve_sources([spec], remote=settings).shards, remote=settings, **kw)


def shard_paths(server: ObjectServer, suffix: str) -> Counter:
    return Counter({p: n for p, n in server.requests.items() if p.endswith(suffix)})


def test_ranged_reads_give_the_local_bytes_one_request_per_sample(root, local):
    with ObjectServer(root) as server:
        reader = remote_reader(server.url(f"{BUCKET}/sft"))
        assert [reader.read(i) for i in range(len(reader))] == local
    assert sorted(shard_paths(server, ".tar").values()) == sorted(COUNTS)  # one ranged GET per sample
    assert set(shard_paths(server, ".idx.json").values()) == {1}  # each index fetched once
    assert server.requests[f"/{BUCKET}/sft/manifest.json"] == 1


@pytest.mark.parametrize("faults", [{"drop_every": 3}, {"fail_first": 6}, {"fail_for_s": 0.3},
                                    {"stall_first": 2, "stall_s": 0.6}], ids=["drops", "503-first", "503-window",
                                                                              "timeouts"])
def test_dropped_connections_503s_and_timeouts_are_retried_until_every_sample_reads(root, local, faults):
    settings = RemoteSettings(timeout_s=0.3, retries=8, backoff_s=0.01) if "stall_s" in faults else FAST
    with ObjectServer(root, **faults) as server:
        reader = remote_reader(server.url(f"{BUCKET}/sft"), settings)
        assert [reader.read(i) for i in range(len(reader))] == local
    assert sum(server.faults.values()) > 0


def test_a_read_failing_past_the_last_retry_is_a_counted_logged_skip(root, caplog):
    broken = f"/{BUCKET}/sft/r-000001.tar"  # every sample of the second shard (12 of 33) stays unreadable
    settings = RemoteSettings(timeout_s=2.0, retries=2, backoff_s=0.001)
    with ObjectServer(root, fail_paths=(broken,)) as server, caplog.at_level(logging.WARNING):
        with pytest.raises(BadSample, match="remote_read_failed") as err:
            remote_reader(server.url(f"{BUCKET}/sft"), settings).read(COUNTS[0])
        assert "r-000001.tar" in str(err.value) and "3 times" in str(err.value)
        batches = list(make_loader([server.url(f"{BUCKET}/sft")], load_tokenizer(), batch_size=3, num_workers=0,
                                   chunk_size=4, remote=settings))
    skipped = [s for b in batches for s in b["skipped"]]
    assert len(skipped) == COUNTS[1] and {reason for _, reason in skipped} == {"remote_read_failed"}
    assert sum(b["stats"]["bad_by_reason"].get("remote_read_failed", 0) for b in batches) == COUNTS[1]
    assert sum(b["num_samples"] for b in batches) == sum(COUNTS) - COUNTS[1]  # batch 3 divides 33: none dropped
    assert server.requests[broken] == 3 * (1 + COUNTS[1])  # 1 + 2 retries per read
    assert "skipped bad sample" in caplog.text and "try 2 of 3" in caplog.text


def test_a_manifest_that_cannot_be_fetched_is_one_line_naming_the_url(root, tmp_path):
    with ObjectServer(root) as server:
        missing = server.url(f"{BUCKET}/nothing-here")
        with pytest.raises(SourceError) as err:
            resolve_sources([missing], remote=FAST)
        endpoint = server.endpoint
    message = str(err.value)
    assert "\n" not in message and f"{missing}/manifest.json" in message and "HTTP 404" in message
    with pytest.raises(SourceError) as err:  # nothing listens there any more: refused, retried, then named
        resolve_sources([f"{endpoint}/{BUCKET}/sft"], remote=RemoteSettings(timeout_s=1, retries=1, backoff_s=0))
    assert "\n" not in str(err.value) and f"{endpoint}/{BUCKET}/sft/manifest.json" in str(err.value)
    assert "failed 2 times" in str(err.value)


def test_hostile_manifest_names_and_a_tampered_index_are_refused(root, tmp_path):
    folder = write_shards(tmp_path / "b" / "sft", [3, 4], prefix="h")
    manifest = json.loads((folder / mf.MANIFEST_NAME).read_text())
    tampered = json.loads((folder / "h-000001.tar.idx.json").read_text())
    tampered["keys"][0] = "h_999999999"
    (folder / "h-000001.tar.idx.json").write_text(json.dumps(tampered))
    with ObjectServer(tmp_path) as server:
        reader = remote_reader(server.url("b/sft"))
        reader.read(0)
        with pytest.raises(mf.ManifestError, match="index_sha256"):
            reader.read(3)
        manifest["shards"][0]["name"] = "../../etc/passwd"
        (folder / mf.MANIFEST_NAME).write_bytes(mf.dumps(manifest))
        with pytest.raises(SourceError, match="plain file names"):
            resolve_sources([server.url("b/sft")], remote=FAST)


def test_a_server_that_ignores_range_is_named(root):
    with ObjectServer(root, ignore_range=True) as server:
        with pytest.raises(BadSample, match="ignored the Range header"):
            remote_reader(server.url(f"{BUCKET}/sft")).read(1)


def test_sources_and_preflight_read_only_the_manifest(root, tmp_path):
    cfg = load_config("launch/configs/debug.yaml")
    cfg.train.batch_size = 2
    with ObjectServer(root) as server:
        cfg.data.train_shards = [server.url(f"{BUCKET}/sft")]
        sources = resolve_sources(cfg.data.train_shards)
        report = Report()
        check_batch(cfg, 1, report)
        loader = make_loader(cfg.data.train_shards, load_tokenizer(), batch_size=2, num_workers=2)  # plans epoch 0
        cfg.data.remote_retries = -1
        bad = Report()
        check_batch(cfg, 1, bad)
        cfg.data.remote_retries = 6
    assert sources.exact and sources.shard_counts == [COUNTS] and len(loader) == sum(COUNTS) // 2
    assert set(server.requests) == {f"/{BUCKET}/sft/manifest.json"}
    assert not report.of(PROBLEM) and any("ranged GET" in f.message for f in report.of(OK))
    assert [f.message for f in bad.of(PROBLEM)] == ["data.remote_retries must be >= 0, got -1"]
    # Locally too: index files that cannot even be parsed do not stop the sources or the preflight.
    folder = write_shards(tmp_path / "local", [4, 6])
    for index in folder.glob("*.idx.json"):
        index.write_text("not json")
    cfg.data.train_shards = [str(folder)]
    report = Report()
    check_batch(cfg, 1, report)
    assert resolve_sources([str(folder)]).shard_counts == [[4, 6]] and not report.of(PROBLEM)
    with pytest.raises(mf.ManifestError):
        ShardReader(resolve_sources([str(folder)]).shards).read(0)


def test_the_index_cache_is_bounded(root, local):
    with ObjectServer(root) as server:
        reader = remote_reader(server.url(f"{BUCKET}/sft"), max_indexes=2)
        for _ in range(2):
            assert [reader.read(i) for i in range(len(reader))] == local
            assert reader.cached_indexes() == 2
    assert set(shard_paths(server, ".idx.json").values()) == {2}  # evicted, fetched again on the second pass


def test_s3_sources_through_an_s3_server_and_through_faults(root, local, s3_env):
    from moto.server import ThreadedMotoServer

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    try:
        host, port = moto.get_host_and_port()
        s3_env.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
        upload(root / BUCKET / "sft", "corpus-bucket", "shards/sft")
        reader = remote_reader("s3://corpus-bucket/shards/sft")
        assert [reader.read(i) for i in range(len(reader))] == local
        with pytest.raises(SourceError, match="s3://corpus-bucket/nope/manifest.json.*NoSuchKey"):
            resolve_sources(["s3://corpus-bucket/nope"], remote=FAST)
    finally:
        moto.stop()
    with ObjectServer(root, drop_every=4, fail_first=3) as server:  # the same server, spoken to as S3
        s3_env.setenv("AWS_ENDPOINT_URL", server.endpoint)
        reader = remote_reader(f"s3://{BUCKET}/sft")
        assert [reader.read(i) for i in range(len(reader))] == local
    assert server.faults["503"] == 3 and server.faults["drop"] + server.faults["drop_mid_body"] > 0


def test_a_403_is_final_over_http_and_signs_an_s3_url_anew_once(root, local, s3_env):
    with ObjectServer(root, fail_first=2, fail_status=403) as server:
        with pytest.raises(SourceError, match="HTTP 403"):
            resolve_sources([server.url(f"{BUCKET}/sft")], remote=FAST)
        s3_env.setenv("AWS_ENDPOINT_URL", server.endpoint)
        reader = remote_reader(f"s3://{BUCKET}/sft")  # the second 403 is answered by a new signature
        assert [reader.read(i) for i in range(len(reader))] == local
    assert server.faults["403"] == 2


def test_s3_without_boto3_names_the_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "boto3" else real(name, *a))
    with pytest.raises(SourceError, match=r"s3://b/x: s3:// sources need boto3: pip install"):
        resolve_sources(["s3://b/x"])


def upload(folder: Path, bucket: str, prefix: str) -> None:
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket=bucket)
    for path in sorted(folder.iterdir()):
        client.put_object(Bucket=bucket, Key=f"{prefix}/{path.name}", Body=path.read_bytes())


def audited_keys(out_dir: Path) -> Counter:
    keys = Counter()
    for path in (out_dir / "samples").glob("rank*.jsonl"):
        for line in path.read_text().splitlines():
            keys.update(json.loads(line)["keys"])
    return keys


def train(spec: str, out_dir: Path, *flags: str) -> int:
    return main(["--config", "launch/configs/debug.yaml", "--train_shards", spec, "--out_dir", str(out_dir),
                 "--batch_size", "3", "--max_steps", "null", "--log_samples", "--data.remote_backoff_s=0.01",
                 "--data.remote_retries=10", *flags])


@pytest.mark.slow
@pytest.mark.parametrize("faults,workers", [({}, 0), ({"drop_every": 5}, 2), ({"fail_from": 12, "fail_for_s": 0.5}, 0)],
                         ids=["plain", "drops-2-workers", "503-window"])
def test_training_from_an_http_folder_audits_every_key_once(root, tmp_path, launch_env, faults, workers):
    # 33 samples, batch 3, one rank: 11 steps, every key once; a fault is retried, never skipped or repeated.
    # The 503 window opens at the 12th request: after the manifest (preflight, loader) and a few samples.
    with ObjectServer(root, **faults) as server:
        assert train(server.url(f"{BUCKET}/sft"), tmp_path / "o", "--num_workers", str(workers)) == 0
    keys = audited_keys(tmp_path / "o")
    assert set(keys) == mf_keys() and set(keys.values()) == {1}
    assert not faults or any(path.endswith((".tar", ".idx.json")) for path in server.faulted)  # the reader's too
    records = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert not any(r.get("bad_samples") for r in records)


@pytest.mark.slow
def test_training_from_an_s3_folder_audits_every_key_once(root, tmp_path, launch_env, s3_env):
    with ObjectServer(root, drop_every=6) as server:
        s3_env.setenv("AWS_ENDPOINT_URL", server.endpoint)
        assert train(f"s3://{BUCKET}/sft", tmp_path / "o", "--num_workers", "2") == 0
    keys = audited_keys(tmp_path / "o")
    assert set(keys) == mf_keys() and set(keys.values()) == {1}


def mf_keys() -> set[str]:
    return {mf.sample_key("r", i + 1) for i in range(sum(COUNTS))}
