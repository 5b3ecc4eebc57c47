"""app/jobs/rows.py: fenced Core writes of a job row, and claims that only one task wins."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from app.db import Commit
from app.jobs import rows, states
from app.models import Job
from tests.factories import USD, Owner, make_held_job, make_job, make_wallet


def _job(session: Session, status: str = states.EXECUTING) -> Job:
    account_id, wallet_id = make_wallet(session)
    job = session.get(Job, make_job(session, account_id, wallet_id))
    assert job is not None
    if job.status != status:
        rows.write(session, job, status=status)
    return job


def _row(session: Session, job: Job) -> tuple[str, int, str | None]:
    return session.execute(
        select(
            Job.__table__.c.status, Job.__table__.c.version, Job.__table__.c.provider_name
        ).where(Job.__table__.c.id == job.id)
    ).one()


def test_write_updates_the_row_bumps_the_version_and_mirrors_the_object(db_session):
    job = _job(db_session)
    version = job.version
    rows.write(db_session, job, status=states.SETTLING, provider_name="alpha")
    assert _row(db_session, job) == (states.SETTLING, version + 1, "alpha")
    assert (job.status, job.version, job.provider_name) == (states.SETTLING, version + 1, "alpha")
    # Nothing is left for the ORM to write a second time.
    assert not db_session.dirty


def test_write_with_a_stale_version_raises_and_changes_nothing(db_session):
    job = _job(db_session)
    rows.write(db_session, job, status=states.SETTLING)
    before = _row(db_session, job)
    job.__dict__["version"] -= 1  # what a worker that lost its claim still believes
    with pytest.raises(StaleDataError):
        rows.write(db_session, job, status=states.SUCCESS, provider_name="late")
    assert _row(db_session, job) == before


def test_write_maps_attribute_names_to_columns(db_session):
    job = _job(db_session)
    rows.write(db_session, job, metadata_={"k": "v"})
    stored = db_session.execute(
        select(Job.__table__.c.metadata).where(Job.__table__.c.id == job.id)
    ).scalar_one()
    assert stored == {"k": "v"}


def test_a_no_flush_write_in_autocommit_commits_by_itself_and_keeps_its_fence(make_account):
    from sqlalchemy import text
    from sqlalchemy.orm.attributes import set_committed_value

    from app.db import autocommit, session_factory, session_scope

    account = make_account("10.00")
    with session_scope() as setup:
        job_id, version = make_held_job(
            setup, Owner(account.account_id, account.wallet_id), 3 * USD
        )
    session = session_factory()()
    try:
        job = session.get(Job, job_id)
        session.rollback()
        assert autocommit(session)
        rows.write(
            session,
            job,
            commit=Commit.ALONE_DEFERRED,
            status=states.SETTLING,
            provider_name="alpha",
        )
        session.rollback()  # nothing to undo: the server committed the statement
        with session_factory()() as other:
            assert _row(other, job) == (states.SETTLING, version + 1, "alpha")
        # The setting lasted for that statement's transaction only.
        assert session.scalar(text("SHOW synchronous_commit")) == "on"
        session.rollback()
        set_committed_value(job, "version", version)  # a worker that lost its claim
        assert autocommit(session)
        with pytest.raises(StaleDataError):
            rows.write(
                session,
                job,
                commit=Commit.ALONE_DEFERRED,
                status=states.SUCCESS,
                provider_name="late",
            )
        with session_factory()() as other:
            assert _row(other, job) == (states.SETTLING, version + 1, "alpha")
    finally:
        session.close()
