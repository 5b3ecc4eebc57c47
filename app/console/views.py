"""The console's pages. HTTP only, as app/api/: parse the form or query, check the session, call
the domain (the API's own commands and queries), render a template."""

from __future__ import annotations

import csv
import io
import json
import logging
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    Response,
    current_app,
    g,
    redirect,
    render_template,
    request,
    stream_with_context,
    url_for,
)
from flask_wtf.csrf import CSRFError
from marshmallow import ValidationError
from sqlalchemy import select
from werkzeug.exceptions import HTTPException, NotFound

from app import accounts, reports, wallet
from app.accounts import Principal
from app.api.auth import RateLimited, enforce_rate_limit
from app.api.inference import ENDPOINT, NativeRenderer, _to_request
from app.api.schemas import InferenceRequestSchema
from app.api.session import db
from app.console import auth, charts, csrf
from app.exceptions import FlopexError
from app.jobs import states
from app.jobs.cancel import announce_cancelled, cancel
from app.jobs.command import Answer, RunInference, validate_idempotency_key
from app.jobs.queries import JobFilter, list_jobs, own_job
from app.jobs.render import render_job, routing_summary
from app.ledger_queries import ledger_page
from app.models import Job, ModelAlias, iso_utc
from app.money import display_usd, micros_to_usd
from app.redis_client import get_redis
from config.settings import PROFILES, get_settings

log = logging.getLogger(__name__)

blp = Blueprint(
    "console",
    __name__,
    url_prefix="/console",
    template_folder="templates",
    static_folder="static",
    static_url_path="/static",
)

PAGE_SIZE = 50
_OPEN = frozenset({"console.sign_in", "console.static"})
_SECURITY_HEADERS = {
    # Pages show a customer's money and keys: never cached, never framed, no inline script.
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
    "script-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


def principal() -> Principal:
    found = auth.current_principal()
    assert found is not None  # _require_session ran first
    return found


@blp.before_request
def _require_session() -> Any:
    if request.endpoint in _OPEN:
        return None
    if auth.current_principal() is None:
        return redirect(url_for("console.sign_in", next=request.full_path.rstrip("?")))
    if request.method == "POST":
        csrf.protect()
    return None


@blp.after_request
def _headers(response: Response) -> Response:
    if request.endpoint != "console.static":
        response.headers.update(_SECURITY_HEADERS)
    return response


@blp.errorhandler(CSRFError)
def _csrf_error(err: CSRFError) -> Any:
    return _error_page(400, "The form expired or did not come from this console; try again.")


@blp.errorhandler(FlopexError)
def _domain_error(err: FlopexError) -> Any:
    return _error_page(err.http_status, err.message, err.code)


@blp.errorhandler(HTTPException)
def _http_error(err: HTTPException) -> Any:
    return _error_page(err.code or 500, err.description or err.name)


@blp.errorhandler(Exception)
def _unexpected(err: Exception) -> Any:
    log.exception("unhandled error in the console")
    return _error_page(500, "Something went wrong on our side; try again.")


@blp.route("/<path:unknown>")
def not_found(unknown: str) -> Any:
    """Any other path under /console: the console's own 404 page, not the API's JSON."""
    raise NotFound(f"There is no page /console/{unknown}.")


def _error_page(status: int, message: str, code: str | None = None) -> Any:
    return render_template("console/error.html", status=status, message=message, code=code), status


@blp.app_template_filter("usd")
def _usd(micros: int | None) -> str:
    if micros is None:
        return "—"
    return f"-{display_usd(-micros)}" if micros < 0 else display_usd(micros)


@blp.app_template_filter("when")
def _when(value: datetime | str | float | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, float | int):
        value = datetime.fromtimestamp(value, UTC)
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@blp.app_template_filter("public_status")
def _public_status(status: str) -> str:
    return states.PUBLIC.get(status, status)


@blp.app_context_processor
def _globals() -> dict[str, Any]:
    return {"signed_in": g.get("console_principal") is not None}


# --- signing in and out ---------------------------------------------------------------------


def _safe_next(target: str | None) -> str:
    """Only a path inside the console: never another site (an open redirect)."""
    if target:
        parts = urlsplit(target)
        if not parts.scheme and not parts.netloc and parts.path.startswith("/console"):
            return target
    return url_for("console.overview")


@blp.route("/sign-in", methods=["GET", "POST"])
def sign_in() -> Any:
    if request.method == "GET":
        if auth.current_principal() is not None:
            return redirect(_safe_next(request.args.get("next")))
        return render_template("console/sign_in.html", next=request.args.get("next", ""))
    csrf.protect()
    raw = request.form.get("api_key", "").strip()
    target = request.form.get("next", "")
    try:
        found = auth.sign_in(raw, request.remote_addr) if raw else None
    except RateLimited as exc:
        return _sign_in_refused(429, exc.message, target)
    if found is None:
        return _sign_in_refused(401, "That API key is invalid or revoked.", target)
    return redirect(_safe_next(target), 303)


def _sign_in_refused(status: int, message: str, target: str) -> Any:
    return render_template("console/sign_in.html", error=message, next=target), status


@blp.route("/sign-out", methods=["POST"])
def sign_out() -> Any:
    auth.sign_out()
    return redirect(url_for("console.sign_in"), 303)


# --- overview -------------------------------------------------------------------------------


@blp.route("/")
def overview() -> Any:
    who = principal()
    session = db()
    state = wallet.get_state(session, who.wallet_id)
    data = reports.overview(session, who.account_id)
    labels = [d.strftime("%m-%d") for d in data.days]
    # Scaled to USD for the axis labels (the bars are in micro-USD).
    spend_chart = charts.bar_chart(
        "Spend per day, last 30 days",
        f"Total {display_usd(data.spend)} over {len(data.days)} days",
        labels,
        [
            charts.Series(
                "spend",
                charts.BLUE,
                [data.spend_by_day.get(d, 0) / 1_000_000 for d in data.days],
            )
        ],
        fmt=charts.usd,
    )
    statuses = ["success", "failed", "cancelled", "running", "queued"]
    requests_chart = charts.bar_chart(
        "Requests per day by status, last 30 days",
        f"{data.requests} requests over {len(data.days)} days",
        labels,
        [
            charts.Series(
                s,
                charts.STATUS_COLOURS[s],
                [data.requests_by_day.get(d, {}).get(s, 0) for d in data.days],
            )
            for s in statuses
        ],
    )
    by_model = charts.hbar_chart(
        "Spend by model, last 30 days",
        "; ".join(f"{k} {display_usd(v)}" for k, v in data.spend_by_model.items()) or "none",
        [(k, v, display_usd(v)) for k, v in data.spend_by_model.items()],
    )
    by_provider = charts.hbar_chart(
        "Spend by provider, last 30 days",
        "; ".join(f"{k} {display_usd(v)}" for k, v in data.spend_by_provider.items()) or "none",
        [(k, v, display_usd(v)) for k, v in data.spend_by_provider.items()],
    )
    return render_template(
        "console/overview.html",
        state=state,
        data=data,
        statuses=statuses,
        spend_chart=spend_chart,
        requests_chart=requests_chart,
        by_model=by_model,
        by_provider=by_provider,
    )


# --- activity -------------------------------------------------------------------------------


def _moment(name: str) -> datetime | None:
    """A time filter from the form: ISO 8601; without a zone (a datetime-local field), UTC."""
    raw = request.args.get(name, "").strip()
    if not raw:
        return None
    try:
        value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise FlopexError(
            "invalid_request", f"{name}: not a date and time ({raw!r}).", name
        ) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _filters(cursor: bool = False) -> JobFilter:
    """The API's job-list filters from the query string (and its cursor, for a page)."""
    status = request.args.get("status") or None
    if status is not None and status not in states.INTERNAL:
        raise FlopexError("invalid_request", f"status: unknown status {status!r}.", "status")
    starting_after = None
    raw = request.args.get("starting_after", "").strip()
    if cursor and raw:
        try:
            starting_after = uuid.UUID(raw)
        except ValueError:
            raise FlopexError("job_not_found", f"No job {raw}.", "starting_after") from None
    return JobFilter(
        status=status,
        starting_after=starting_after,
        model=request.args.get("model", "").strip() or None,
        customer_ref=request.args.get("customer_ref", "").strip() or None,
        created_after=_moment("created_after"),
        created_before=_moment("created_before"),
    )


def _model_names() -> list[str]:
    return list(
        db().scalars(select(ModelAlias.alias).where(ModelAlias.enabled).order_by(ModelAlias.alias))
    )


@blp.route("/activity")
def activity() -> Any:
    who = principal()
    filters = _filters(cursor=True)
    page = list_jobs(db(), who.account_id, filters, PAGE_SIZE)
    query = {k: v for k, v in request.args.items() if k != "starting_after" and v}
    return render_template(
        "console/activity.html",
        page=page,
        filters=filters,
        args=request.args,
        query=query,
        models=_model_names(),
        statuses=list(states.INTERNAL),
        presets=_presets(),
    )


def _presets() -> list[tuple[str, str]]:
    """Quick time ranges, as the datetime-local field writes a time (UTC, to the second)."""
    now = datetime.now(UTC).replace(microsecond=0, tzinfo=None)
    return [
        (label, (now - timedelta(hours=hours)).isoformat())
        for label, hours in (("Last hour", 1), ("Last 24 hours", 24), ("Last 7 days", 168))
    ]


def _csv(header: list[str], rows: Iterable[list[Any]], filename: str) -> Response:
    def generate() -> Iterator[str]:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(header)
        for i, row in enumerate(rows, 1):
            writer.writerow(row)
            if i % 500 == 0:
                yield buffer.getvalue()
                buffer.seek(0)
                buffer.truncate()
        yield buffer.getvalue()

    response = Response(stream_with_context(generate()), mimetype="text/csv")
    response.headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


@blp.route("/activity.csv")
def activity_csv() -> Any:
    who = principal()
    enforce_rate_limit(who)  # an export is a scan of the account's history: the API's budget
    filters = _filters()
    header = [
        "id",
        "created_at",
        "finished_at",
        "status",
        "model",
        "provider",
        "performance_profile",
        "customer_ref",
        "input_tokens",
        "output_tokens",
        "cost_usd",
        "latency_ms",
        "error_code",
    ]

    def rows() -> Iterator[list[Any]]:
        for r in reports.export_jobs(db(), who.account_id, filters):
            yield [
                r.id,
                iso_utc(r.created_at),
                iso_utc(r.finished_at),
                states.PUBLIC[r.status],
                r.model,
                r.provider_name or "",
                r.performance_profile,
                r.customer_ref or "",
                "" if r.input_tokens is None else r.input_tokens,
                "" if r.output_tokens is None else r.output_tokens,
                micros_to_usd(r.charge_micros) if r.status == states.SUCCESS else "",
                "" if r.latency_ms is None else r.latency_ms,
                r.error_code or "",
            ]

    return _csv(header, rows(), "flopex-activity.csv")


# --- a job ----------------------------------------------------------------------------------


def _own_job(job_id: str) -> Job:
    # Another account's job is the same 404 as one that does not exist (the API's own lookup).
    return own_job(db(), principal().account_id, job_id)


def route_pictures(job: Job) -> dict[str, Any]:
    """The routing trace as the API shows it (routing_summary), drawn."""
    summary = routing_summary(job)
    dropped = {d.get("provider"): d.get("reason", "") for d in summary["dropped"]}
    points = []
    for q in summary["quotes"]:
        name = q["provider"]
        rate = q["success_rate"]
        note = (
            f"{'live' if q['live'] else 'not live'}, "
            f"est. {q['estimated_latency_ms'] if q['estimated_latency_ms'] is not None else '?'} ms, "
            f"est. ${q['estimated_charge_usd']}, success "
            f"{'—' if rate is None else f'{rate * 100:.1f}%'}"
            + (f", dropped: {dropped[name]}" if name in dropped else "")
        )
        points.append(
            charts.Point(
                # The success rate beside the name: the one quote dimension not on an axis.
                name if rate is None else f"{name} · {rate * 100:.0f}%",
                q["estimated_latency_ms"],
                float(q["estimated_charge_usd"]),
                bool(q["live"]),
                note,
                chosen=name == summary["winner"],
                dropped=name in dropped,
            )
        )
    quotes_chart = charts.scatter_chart(
        "Quotes: estimated latency against estimated charge, with success rates",
        "; ".join(f"{p.label}: {p.note}" for p in points) or "no quotes",
        points,
        "ms",
    )
    spans = [
        charts.Span(
            a["provider"],
            a.get("latency_ms"),
            a["outcome"] == "success",
            f"{a['outcome']}"
            + (f" ({a['failure']})" if "failure" in a else "")
            + (f", {a['latency_ms']} ms" if a.get("latency_ms") is not None else ""),
        )
        for a in summary["attempts"]
    ]
    attempts_chart = charts.timeline_chart(
        "Attempts, in order",
        "; ".join(f"{s.label}: {s.note}" for s in spans) or "no attempt",
        spans,
    )
    return {"summary": summary, "quotes_chart": quotes_chart, "attempts_chart": attempts_chart}


@blp.route("/jobs/<job_id>")
def job(job_id: str) -> Any:
    who = principal()
    found = _own_job(job_id)
    body = render_job(found)
    entries = reports.job_ledger(db(), who.wallet_id, found.id)
    return render_template(
        "console/job.html",
        job=found,
        body=body,
        document=current_app.json.dumps(body, indent=2),
        final=found.status in states.FINAL,
        cancellable=found.status in states.CANCELLABLE,
        entries=entries,
        **route_pictures(found),
    )


@blp.route("/jobs/<job_id>/cancel", methods=["POST"])
def cancel_job(job_id: str) -> Any:
    found = _own_job(job_id)
    session = db()
    cancelled = cancel(session, found)
    session.commit()
    announce_cancelled(cancelled, get_redis(), current_app.extensions["celery"])
    return redirect(url_for("console.job", job_id=job_id), 303)


# --- wallet ---------------------------------------------------------------------------------


def _ledger_cursor() -> int | None:
    raw = request.args.get("starting_after", "").strip()
    if not raw:
        return None
    if not raw.isdigit():
        raise FlopexError("not_found", f"No ledger entry {raw}.", "starting_after")
    return int(raw)


def _entry_row(e: Any) -> list[Any]:
    return [
        e.id,
        iso_utc(e.created_at),
        e.kind,
        micros_to_usd(e.amount_micros),
        micros_to_usd(e.held_delta_micros),
        micros_to_usd(e.balance_after_micros),
        micros_to_usd(e.held_after_micros),
        e.job_id or "",
        e.memo,
    ]


@blp.route("/wallet")
def wallet_page() -> Any:
    who = principal()
    session = db()
    state = wallet.get_state(session, who.wallet_id)
    page = ledger_page(session, who.wallet_id, PAGE_SIZE, _ledger_cursor())
    return render_template("console/wallet.html", state=state, page=page)


@blp.route("/wallet.csv")
def wallet_csv() -> Any:
    who = principal()
    enforce_rate_limit(who)
    header = [
        "id",
        "created_at",
        "kind",
        "amount_usd",
        "held_delta_usd",
        "balance_after_usd",
        "held_after_usd",
        "job_id",
        "memo",
    ]

    def rows() -> Iterator[list[Any]]:
        # The query runs while the response streams, inside its context (stream_with_context),
        # whose teardown closes the session: opened in the view, its connection would outlive
        # the request.
        for e in reports.export_ledger(db(), who.wallet_id):
            yield _entry_row(e)

    return _csv(header, rows(), "flopex-ledger.csv")


# --- market ---------------------------------------------------------------------------------


@blp.route("/market")
def market() -> Any:
    settings = get_settings()
    data = reports.market(db(), get_redis(), settings)
    sparks = {
        name: charts.sparkline(
            f"{name}: round trip of its checks, per minute, last hour",
            [s.latency_ms for s in p.history],
            [s.all_live for s in p.history],
        )
        for name, p in data.providers.items()
    }
    return render_template("console/market.html", data=data, sparks=sparks, markup=settings.markup)


@blp.app_template_filter("with_markup")
def _with_markup(micros_per_m: int, markup: Decimal) -> str:
    """A provider's price per million tokens with our margin, exactly (at least six places)."""
    value = Decimal(micros_per_m) * (1 + markup) / 1_000_000
    if value.as_tuple().exponent > -6:  # type: ignore[operator]
        value = value.quantize(Decimal("0.000001"))
    return f"${value:f}"


# --- playground -----------------------------------------------------------------------------

_FIELDS = (
    "model",
    "input",
    "max_output_tokens",
    "performance_profile",
    "routing_strategy",
    "customer_ref",
    "max_price_usd",
    "max_latency_ms",
    "metadata",
    "callback_url",
)


def _playground_body(form: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The form as the API's JSON body, and that body loaded by the API's own schema (which
    raises ValidationError): empty fields are left out; whole numbers and the metadata object
    are parsed here (max_price_usd goes as a string, which the API accepts too)."""
    body: dict[str, Any] = {}
    problems: dict[str, list[str]] = {}
    for name in _FIELDS:
        raw = form.get(name, "")
        if name != "input":
            raw = raw.strip()
        if raw == "":
            continue
        if name in ("max_output_tokens", "max_latency_ms"):
            try:
                body[name] = int(raw)
            except ValueError:
                problems[name] = ["Not a whole number."]
        elif name == "metadata":
            try:
                body[name] = json.loads(raw)
            except ValueError:
                problems[name] = ["Not valid JSON."]
        else:
            body[name] = raw
    if problems:
        raise ValidationError(problems)
    loaded: dict[str, Any] = InferenceRequestSchema().load(body)
    return body, loaded


@blp.route("/playground", methods=["GET", "POST"])
def playground() -> Any:
    form = {k: request.form.get(k, "") for k in (*_FIELDS, "idempotency_key")}
    context: dict[str, Any] = {
        "models": _model_names(),
        "profiles": PROFILES,
        "strategies": ("lowest_cost", "prefer_live"),
        "form": form,
    }
    if request.method == "GET":
        form.update(
            model="llama-3.1-8b",
            input="Summarize inference routing in two sentences.",
            max_output_tokens="256",
            performance_profile="balanced",
            routing_strategy="lowest_cost",
            # A fresh key per form: sending the same form twice (a double click, the browser's
            # resubmit) replays the first answer instead of running and charging again.
            idempotency_key=str(uuid.uuid4()),
        )
        return render_template("console/playground.html", **context)
    who = principal()
    try:
        body, args = _playground_body(form)
    except ValidationError as exc:
        context["errors"] = _messages(exc.messages)
        return render_template("console/playground.html", **context), 400
    sent_key = form["idempotency_key"].strip() or None
    try:
        enforce_rate_limit(who)
        answer = _run_inference(who, args, body, sent_key)
    except FlopexError as exc:
        context["errors"] = [(exc.param or "request", f"{exc.message} ({exc.code})")]
        return render_template("console/playground.html", **context), exc.http_status
    session = db()
    session.expire_all()
    found = session.get(Job, answer.job_id) if answer.job_id is not None else None
    if found is None:  # an answer without a job: only an error, already shown as one
        context["errors"] = [("request", answer.body)]
        return render_template("console/playground.html", **context), answer.status
    context.update(
        job=found,
        body=render_job(found),
        final=found.status in states.FINAL,
        replayed=answer.replayed,
        key_in_use=answer.key_in_use,
        sent_key=sent_key,
    )
    if found.status == states.SUCCESS or (found.quotes and "live" in found.quotes[0]):
        context.update(route_pictures(found))
    # The next send is a new request: a new key (the one sent is shown with the result).
    form["idempotency_key"] = str(uuid.uuid4())
    return render_template("console/playground.html", **context)


def _run_inference(
    who: Principal, args: dict[str, Any], body: dict[str, Any], key: str | None
) -> Answer:
    """POST /v1/inference's own command (app/jobs/command.py), synchronous: the idempotency
    claim, the job and its hold, the dispatch and the wait for the worker's signal. A job
    still running when the wait ends is shown as it stands."""
    return RunInference(
        db(),
        who,
        _to_request(args),
        get_settings(),
        endpoint=ENDPOINT,
        renderer=NativeRenderer(),
        celery=current_app.extensions["celery"],
        idempotency_key=validate_idempotency_key(key),
        body=body if key is not None else None,
        request_id=g.get("request_id"),
        models=current_app.extensions["flopex_models"],
    ).run()


def _messages(messages: Any) -> list[tuple[str, str]]:
    if isinstance(messages, dict):
        return [
            (str(k), "; ".join(map(str, v)) if isinstance(v, list) else str(v))
            for k, v in messages.items()
        ]
    return [("request", str(messages))]


# --- keys -----------------------------------------------------------------------------------


@blp.route("/keys", methods=["GET", "POST"])
def keys() -> Any:
    who = principal()
    session = db()
    issued = None
    if request.method == "POST":
        name = request.form.get("name", "").strip()[:200]
        _, issued = accounts.issue_key(session, who.account_id, name)
        session.commit()
    rows = reports.list_keys(session, who.account_id)
    return render_template("console/keys.html", keys=rows, issued=issued, current=who.api_key_id), (
        201 if issued else 200
    )


@blp.route("/keys/<prefix>/revoke", methods=["POST"])
def revoke_key(prefix: str) -> Any:
    who = principal()
    session = db()
    row = reports.own_key(session, who.account_id, prefix)
    if row is None:
        raise NotFound(f"No key {prefix}.")
    active = [k for k in reports.list_keys(session, who.account_id) if k.revoked_at is None]
    if row.revoked_at is None and len(active) == 1:
        # The account's last key: revoking it would lock the customer out of the API and here.
        return _error_page(409, "This is your only active key: issue another before revoking it.")
    accounts.revoke_key(session, prefix)
    session.commit()
    auth.forget_key(row.key_hash)
    if row.id == who.api_key_id:
        auth.sign_out()  # the session's own key: the session ends with it
        return redirect(url_for("console.sign_in"), 303)
    return redirect(url_for("console.keys"), 303)
