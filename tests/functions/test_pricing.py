"""The price table (GPU_PRICES) and the price per hour the trainer gets in its env."""

from __future__ import annotations

import dataclasses

import pytest
from actorgen import pricing, schema
from actorgen.config import Settings
from actorgen.pricing import PriceTableError, parse_price_table, worker_price_per_hour


def test_default_table_prices_the_default_worker() -> None:
    table = parse_price_table(pricing.DEFAULT_GPU_PRICES)
    s = Settings()
    price = worker_price_per_hour(table, s.machine_type, s.accelerator_type, s.accelerator_count)
    assert price == pytest.approx(table["g2-standard-8"] + table["NVIDIA_L4"])


def test_worker_price_is_machine_plus_each_gpu() -> None:
    table = parse_price_table(" n1-standard-8 = 0.5 , NVIDIA_TESLA_T4=0.25,, ")
    assert table == {"n1-standard-8": 0.5, "NVIDIA_TESLA_T4": 0.25}
    assert worker_price_per_hour(table, "n1-standard-8", "NVIDIA_TESLA_T4", 2) == 1.0
    assert worker_price_per_hour(table, "n1-standard-8", "", 0) == 0.5


def test_spot_entries_win_for_spot_jobs_only() -> None:
    table = parse_price_table("g2-standard-8=0.4,NVIDIA_L4=0.6,SPOT:NVIDIA_L4=0.2")
    assert worker_price_per_hour(table, "g2-standard-8", "NVIDIA_L4", 1, "SPOT") == 0.6
    assert worker_price_per_hour(table, "g2-standard-8", "NVIDIA_L4", 1, "STANDARD") == 1.0


def test_a_missing_part_gives_no_estimate_rather_than_a_low_one() -> None:
    table = parse_price_table("NVIDIA_L4=0.6")
    assert worker_price_per_hour(table, "g2-standard-8", "NVIDIA_L4", 1) is None
    assert worker_price_per_hour({"g2-standard-8": 0.4}, "g2-standard-8", "NVIDIA_L4", 1) is None


@pytest.mark.parametrize(
    ("text", "needle"),
    [("NVIDIA_L4", "must look like NVIDIA_L4=0.64"), ("NVIDIA_L4=cheap", "number >= 0"),
     ("NVIDIA_L4=-1", "number >= 0"), ("=1", "must look like"), ("NVIDIA_L4=nan", ">= 0")],
)
def test_bad_entries_name_what_to_fix(text: str, needle: str) -> None:
    with pytest.raises(PriceTableError, match=needle) as err:
        parse_price_table(text)
    assert "GPU_PRICES" in str(err.value)


def test_the_attempts_price_reaches_both_executors_env() -> None:
    for kind in ("vertex", "local"):
        s = Settings(executor_kind=kind, gpu_prices="g2-standard-8=0.5,NVIDIA_L4=0.75")
        assert s.executor_settings().extra_env[schema.ENV_GPU_PRICE_PER_HOUR] == "1.25"


def test_no_price_env_without_an_estimate(caplog: pytest.LogCaptureFixture) -> None:
    assert schema.ENV_GPU_PRICE_PER_HOUR not in Settings(gpu_prices="").executor_settings().extra_env
    bad = Settings(gpu_prices="NVIDIA_L4=lots")
    assert schema.ENV_GPU_PRICE_PER_HOUR not in bad.executor_settings().extra_env
    assert "NVIDIA_L4=lots" in caplog.text
    unknown = Settings(gpu_prices="NVIDIA_L4=1", machine_type="x9-huge")
    assert unknown.worker_price_per_hour() is None
    assert "no price for x9-huge" in caplog.text


def test_load_settings_reads_gpu_prices(monkeypatch: pytest.MonkeyPatch) -> None:
    from actorgen import config

    monkeypatch.setenv("GPU_PRICES", " g2-standard-8=1 ")
    assert config.load_settings().gpu_prices == "g2-standard-8=1"


def test_both_executors_put_the_price_in_the_trainers_environment() -> None:
    from actorgen.executors import SubmitRequest, build_executor

    settings = Settings(project="p", bucket="b", trainer_image_uri="r/actorgen/trainer:t",
                        gpu_prices="g2-standard-8=0.5,NVIDIA_L4=0.75")
    request = SubmitRequest("job1", 1, "alice")
    local = build_executor(dataclasses.replace(settings, executor_kind="local").executor_settings())
    assert local.environment(request)[schema.ENV_GPU_PRICE_PER_HOUR] == "1.25"
    vertex = build_executor(settings.executor_settings())
    container = vertex.build_custom_job(request).job_spec.worker_pool_specs[0].container_spec
    assert {e.name: e.value for e in container.env}[schema.ENV_GPU_PRICE_PER_HOUR] == "1.25"
