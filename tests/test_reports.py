"""The console's domain queries (app/reports.py) on real PostgreSQL."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy.orm import Session

from app import reports
from app.exceptions import FlopexError
from app.jobs.queries import JobFilter, list_jobs, own_job
from app.models import Job
from tests.factories import make_job

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def add_job(session: Session, account: Any, created: datetime, status: str, **columns: Any) -> Job:
    job = session.get(
        Job,
        make_job(
            session,
            account.account_id,
            account.wallet_id,
            status=status,
            created_at=created,
            **columns,
        ),
    )
    assert job is not None
    return job


def test_overview_groups_the_last_30_utc_days(db_session: Session, make_account: Any) -> None:
    me, other = make_account(), make_account()
    add_job(db_session, me, NOW, "success", charge_micros=100, provider_name="alpha")
    add_job(
        db_session,
        me,
        NOW - timedelta(hours=1),
        "success",
        charge_micros=50,
        provider_name="bravo",
        model="qwen-7b",
    )
    add_job(db_session, me, NOW - timedelta(days=1), "failed", charge_micros=None)
    add_job(db_session, me, NOW - timedelta(days=1), "executing")
    # A failed job never charges, whatever the column says; older than 30 days and another
    # account's jobs are not counted.
    add_job(db_session, me, NOW - timedelta(days=2), "failed", charge_micros=999)
    add_job(db_session, me, NOW - timedelta(days=30), "success", charge_micros=7)
    add_job(db_session, other, NOW, "success", charge_micros=1000, provider_name="alpha")

    data = reports.overview(db_session, me.account_id, now=NOW)
    today, yesterday = NOW.date(), NOW.date() - timedelta(days=1)
    assert data.days[0] == today - timedelta(days=29) and data.days[-1] == today
    assert data.spend == 150 and data.spend_by_day == {today: 150}
    assert data.requests == 5
    assert data.requests_by_day[today] == {"success": 2}
    assert data.requests_by_day[yesterday] == {"failed": 1, "running": 1}
    assert data.spend_by_model == {"llama-3.1-8b": 100, "qwen-7b": 50}
    assert list(data.spend_by_provider) == ["alpha", "bravo"]


def test_job_list_filters_model_too_and_the_export_matches(
    db_session: Session, make_account: Any
) -> None:
    me, other = make_account(), make_account()
    jobs = [
        add_job(db_session, me, NOW - timedelta(minutes=i), "success", model=m, customer_ref=r)
        for i, (m, r) in enumerate(
            [("llama-3.1-8b", "a"), ("qwen-7b", "a"), ("qwen-7b", "b"), ("llama-3.1-8b", "b")]
        )
    ]
    theirs = add_job(db_session, other, NOW, "success")
    everything = list_jobs(db_session, me.account_id, JobFilter(), 3)
    assert [j.id for j in everything.jobs] == [j.id for j in jobs[:3]]
    assert everything.has_more and everything.next_cursor == str(jobs[2].id)
    rest = list_jobs(
        db_session, me.account_id, JobFilter(starting_after=uuid.UUID(everything.next_cursor)), 3
    )
    assert [j.id for j in rest.jobs] == [jobs[3].id] and not rest.has_more
    qwen_b = list_jobs(db_session, me.account_id, JobFilter(model="qwen-7b", customer_ref="b"), 10)
    assert [j.id for j in qwen_b.jobs] == [jobs[2].id]
    window = JobFilter(created_after=NOW - timedelta(minutes=2, seconds=30), created_before=NOW)
    assert [j.id for j in list_jobs(db_session, me.account_id, window, 10).jobs] == [
        jobs[1].id,
        jobs[2].id,
    ]
    with pytest.raises(FlopexError) as refused:
        list_jobs(db_session, me.account_id, JobFilter(starting_after=theirs.id), 3)
    assert refused.value.code == "job_not_found"
    exported = list(reports.export_jobs(db_session, me.account_id, JobFilter(status="success")))
    assert [r.id for r in exported] == [j.id for j in jobs]
    for unknown in (str(theirs.id), "not-a-uuid", str(uuid.uuid4())):
        with pytest.raises(FlopexError):
            own_job(db_session, me.account_id, unknown)
