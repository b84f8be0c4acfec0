"""Redis I/O for the stream contract: the only code in rawwave that talks to Redis.

One `Streams` per process wraps one shared connection pool. It moves `rawwave.contract` messages
and owns the consumer-group mechanics: reading an announce entry makes a worker the owner of that
session; the entry stays pending (and so reclaimable) until the session is finished or
dead-lettered.

Redis going away is expected (restart, failover, a network cut): idempotent calls (explicit-id
writes, reads, acks) retry with jittered exponential backoff for up to `redis_retry_s`, and the
process logs one line when Redis becomes unreachable and one when it is back (`RedisLink`), never
one per failed call.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from rawwave import contract
from rawwave.contract import AudioEntry, ContractError, Event, SessionAnnounce
from rawwave.local_stack import read_stack_state
from rawwave.logs import get_logger
from rawwave.settings import Settings

log = get_logger(__name__)

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
TRANSIENT_ERRORS = (RedisConnectionError, RedisTimeoutError, ConnectionError, TimeoutError)  # incl. LOADING
BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 2.0  # a recovered Redis is noticed within this (plus jitter)
BACKLOG_SCAN = 10_000  # most unread announce entries counted one by one (when Redis has no lag)
FLAP_S = 5.0  # a failure this soon after recovering (a stale pooled connection) continues the outage


def resolve_redis_url(settings: Settings) -> str:
    """RAWWAVE_REDIS_URL wins; else the stack `rawwave up` is running; else the local default."""
    if settings.redis_url:
        return settings.redis_url
    state = read_stack_state(settings.state_dir)
    return state.redis_url if state else DEFAULT_REDIS_URL


def connect_redis(settings: Settings, url: str | None = None) -> Any:
    """One client (and so one pool) per process; socket timeout outlives every blocking read."""
    options: dict[str, Any] = {
        "socket_timeout": settings.redis_socket_timeout_s,
        "socket_connect_timeout": 5.0,
        "health_check_interval": 15,
    }
    url = url or resolve_redis_url(settings)
    if settings.redis_cluster:
        return aioredis.RedisCluster.from_url(url, max_connections=settings.redis_max_connections, **options)
    # a caller past the pool's size waits for a connection instead of failing: many sessions each hold
    # one for a blocking read, and a burst beyond the pool is load, not an outage
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=settings.redis_max_connections,
        timeout=settings.redis_socket_timeout_s,
        **options,
    )
    return aioredis.Redis(connection_pool=pool)


class RedisLink:
    """Whether Redis answers, as this process last saw it: logs only when that changes."""

    def __init__(self) -> None:
        self.down_since: float | None = None
        self.up_since = -FLAP_S
        self.failures = 0  # failed calls during the current outage
        self.outages = 0  # outages seen so far (a caller can tell "something happened since")
        self._quiet = False  # this outage continues one already logged

    def failed(self, error: BaseException) -> None:
        self.failures += 1
        if self.down_since is None:
            self.down_since, self.outages = time.monotonic(), self.outages + 1
            self._quiet = self.down_since - self.up_since < FLAP_S
            if not self._quiet:
                log.warning(
                    "redis unreachable: retrying with backoff", error=f"{type(error).__name__}: {error}"
                )

    def ok(self) -> None:
        if self.down_since is not None:
            down_s = round(time.monotonic() - self.down_since, 2)
            if not self._quiet:
                log.info("redis reachable again", down_s=down_s, failed_calls=self.failures)
            self.down_since, self.failures, self.up_since = None, 0, time.monotonic()


class Backoff:
    """Jittered exponential delays for one retrying caller: 50 ms doubling to 2 s, each 50-100%."""

    def __init__(self) -> None:
        self.delay = BACKOFF_FIRST_S

    def next_s(self) -> float:
        delay, self.delay = self.delay, min(self.delay * 2, BACKOFF_MAX_S)
        return delay * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        self.delay = BACKOFF_FIRST_S


@dataclass(frozen=True)
class Claim:
    """A session this consumer owns: its announce entry is pending under our name."""

    partition: int
    entry_id: bytes
    deliveries: int
    announce: SessionAnnounce | None  # None: the entry was malformed
    error: str = ""

    @property
    def session(self) -> str:
        return self.announce.session if self.announce else self.entry_id.decode()


class Streams:
    def __init__(self, redis: Any, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self._partitions = settings.announce_partitions
        self._next_partition = 0
        self.link = RedisLink()

    @classmethod
    def connect(cls, settings: Settings, url: str | None = None) -> Streams:
        return cls(connect_redis(settings, url), settings)

    async def close(self) -> None:
        await self.redis.aclose()

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    # -- sessions: announce, audio, events ---------------------------------------------------------

    async def announce(self, message: SessionAnnounce) -> None:
        key = contract.announce_key(contract.partition_of(message.session, self._partitions))
        await self.retrying(lambda: self.redis.xadd(key, contract.encode_announce(message)))

    async def store_image(self, session: str, image: bytes) -> None:
        await self.retrying(lambda: self.redis.set(contract.image_key(session), image, ex=self._live_ttl_s()))

    async def load_image(self, session: str) -> bytes | None:
        value: bytes | None = await self.retrying(lambda: self.redis.get(contract.image_key(session)))
        return value

    async def append_audio(self, session: str, entry: AudioEntry) -> bool:
        """Append one chunk (or the end marker); False when that seq is already there."""
        return await self._xadd_once(contract.audio_key(session), entry.seq, contract.encode_audio(entry))

    async def read_audio(
        self, session: str, after_seq: int, count: int = 64, block_ms: int | None = None
    ) -> list[AudioEntry]:
        """Audio entries after `after_seq`; raises ContractError on a malformed entry."""
        rows = await self._xread(contract.audio_key(session), after_seq, count, block_ms)
        return [contract.decode_audio(fields) for _, fields in rows]

    async def audio_exists(self, session: str) -> bool:
        return bool(await self.retrying(lambda: self.redis.exists(contract.audio_key(session))))

    async def publish(self, event: Event) -> bool:
        """Publish an event; False when an event with that seq was already published (by anyone)."""
        return await self._xadd_once(
            contract.events_key(event.session), event.seq, contract.encode_event(event)
        )

    async def read_events(
        self, session: str, after_seq: int = 0, count: int = 256, block_ms: int | None = None
    ) -> list[Event]:
        rows = await self._xread(contract.events_key(session), after_seq, count, block_ms)
        return [contract.decode_event(fields) for _, fields in rows]

    async def last_event_seq(self, session: str) -> int:
        rows = await self.retrying(lambda: self.redis.xrevrange(contract.events_key(session), count=1))
        return contract.seq_of(rows[0][0]) if rows else 0

    async def expire_session(self, session: str, ttl_s: int | None = None) -> None:
        ttl = ttl_s if ttl_s is not None else self.settings.session_ttl_s

        def expire_all() -> Any:  # a pipeline empties itself when it runs: build one per attempt
            pipe = self.redis.pipeline(transaction=False)
            for key in contract.session_keys(session):
                pipe.expire(key, ttl)
            return pipe.execute()

        await self.retrying(expire_all)

    # -- ownership through the workers' group ------------------------------------------------------

    async def ensure_groups(self) -> None:
        """Create the workers' group on every partition; an existing group is success (BUSYGROUP)."""
        for partition in range(self._partitions):
            try:
                await self.redis.xgroup_create(
                    contract.announce_key(partition), contract.WORKERS_GROUP, id="0", mkstream=True
                )
            except ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    async def claim_new(self, consumer: str, count: int = 1, block_ms: int = 1000) -> list[Claim]:
        """Take ownership of sessions nobody has read yet, one partition at a time, round-robin."""
        partition = self._next_partition
        self._next_partition = (partition + 1) % self._partitions
        block = max(10, block_ms // self._partitions)
        key = contract.announce_key(partition)
        rows = await self._with_group(
            lambda: self.redis.xreadgroup(
                contract.WORKERS_GROUP, consumer, {key: ">"}, count=count, block=block
            )
        )
        entries = rows[0][1] if rows else []
        if isinstance(rows, dict):  # RESP3 answers with a mapping
            entries = next(iter(rows.values()), [[]])[0]
        return [self._claim(partition, entry_id, fields, deliveries=1) for entry_id, fields in entries]

    async def reclaim_idle(self, consumer: str, count: int = 1) -> list[Claim]:
        """Take over sessions whose owner went quiet for `reclaim_idle_ms` (dead or stuck)."""
        claims: list[Claim] = []
        for partition in range(self._partitions):
            key = contract.announce_key(partition)
            reply = await self._with_group(
                lambda key=key: self.redis.xautoclaim(
                    key, contract.WORKERS_GROUP, consumer, self.settings.reclaim_idle_ms, "0-0", count=count
                )
            )
            entries = [(entry_id, fields) for entry_id, fields in reply[1] if fields is not None]
            deliveries = await self._delivery_counts(key, [entry_id for entry_id, _ in entries])
            claims += [self._claim(partition, i, f, deliveries.get(i, 1)) for i, f in entries]
        return claims[:count] if count else claims

    async def keep_claims(self, consumer: str, claims: Sequence[Claim]) -> set[bytes]:
        """Reset the idle time of our live claims so nobody reclaims them; returns the ids we lost."""
        lost: set[bytes] = set()
        for claim in claims:
            key = contract.announce_key(claim.partition)
            owner = await self._owner(key, claim.entry_id)
            if owner != consumer:
                lost.add(claim.entry_id)
                continue
            await self.redis.xclaim(key, contract.WORKERS_GROUP, consumer, 0, [claim.entry_id], justid=True)
        return lost

    async def release(self, consumer: str, claim: Claim) -> None:
        """Hand a live session back (a draining worker): it stays pending, but looks idle for
        `reclaim_idle_ms` already, so the next worker's reclaim_idle takes it over at once. Its delivery
        count goes back by one, so the hand-over is not counted against the session: rolling restarts
        must not dead-letter a healthy session after max_deliveries of them."""
        key = contract.announce_key(claim.partition)
        idle, ids = self.settings.reclaim_idle_ms, [claim.entry_id]
        await self.redis.xclaim(key, contract.WORKERS_GROUP, consumer, 0, ids, idle=idle,
                                retrycount=max(0, claim.deliveries - 1), justid=True)  # fmt: skip

    async def still_owner(self, consumer: str, claim: Claim) -> bool:
        return await self._owner(contract.announce_key(claim.partition), claim.entry_id) == consumer

    async def announce_exists(self, claim: Claim) -> bool:
        """False when the session's announce entry is gone: Redis lost its data (FLUSHALL, a restart
        without persistence), as opposed to another worker having taken the session over."""
        key, entry_id = contract.announce_key(claim.partition), claim.entry_id
        return bool(await self.retrying(lambda: self.redis.xrange(key, entry_id, entry_id, count=1)))

    async def finish(self, claim: Claim) -> None:
        """The session is over: ack its announce entry and let its keys expire."""
        key = contract.announce_key(claim.partition)
        await self.retrying(lambda: self.redis.xack(key, contract.WORKERS_GROUP, claim.entry_id))
        await self.expire_session(claim.session)

    async def dead_letter(self, claim: Claim, reason: str, worker: str) -> None:
        message = contract.DeadLetter(
            session=claim.session if contract.SESSION_ID_PATTERN.match(claim.session) else "malformed",
            reason=reason,
            deliveries=max(1, claim.deliveries),
            worker=worker,
            at_ms=_now_ms(),
        )
        await self.redis.xadd(contract.DEADLETTER_KEY, contract.encode_dead_letter(message))
        await self.finish(claim)

    async def read_dead_letters(self) -> list[contract.DeadLetter]:
        rows = await self.redis.xrange(contract.DEADLETTER_KEY)
        return [contract.decode_dead_letter(fields) for _, fields in rows]

    async def pending_count(self) -> int:
        total = 0
        for partition in range(self._partitions):
            try:
                summary = await self.redis.xpending(contract.announce_key(partition), contract.WORKERS_GROUP)
            except ResponseError:
                continue
            total += int(summary["pending"])
        return total

    async def backlog(self) -> int:
        """Sessions announced but not finished: per partition, entries the workers' group has not read
        yet (`lag`) plus entries read and not yet acked (`pending`), both from one XINFO GROUPS."""
        total = 0
        for partition in range(self._partitions):
            key = contract.announce_key(partition)
            try:
                groups = await self.retrying(lambda key=key: self.redis.xinfo_groups(key))
            except ResponseError:  # no stream yet: nothing announced there
                continue
            for group in groups:
                if _str(group["name"]) == contract.WORKERS_GROUP:
                    total += int(group["pending"]) + await self._unread(key, group)
        return total

    async def trim_announcements(self, max_age_ms: int) -> None:
        """Drop old announce entries, but never one still pending (MINID <= oldest pending id)."""
        for partition in range(self._partitions):
            key = contract.announce_key(partition)
            min_id = f"{max(0, _now_ms() - max_age_ms)}-0"
            try:
                summary = await self.redis.xpending(key, contract.WORKERS_GROUP)
            except ResponseError:
                continue
            if summary["pending"]:
                min_id = min(min_id, summary["min"].decode(), key=_id_tuple)
            await self.redis.xtrim(key, minid=min_id, approximate=False)

    async def follow_announcements(
        self, after: dict[int, str], block_ms: int = 1000
    ) -> list[tuple[int, str, SessionAnnounce]]:
        """New sessions for observers (`rawwave consume --all`); does not touch ownership."""
        found: list[tuple[int, str, SessionAnnounce]] = []
        for partition in range(self._partitions):
            key = contract.announce_key(partition)
            block = block_ms if self._partitions == 1 else None
            rows = await self.redis.xread({key: after.get(partition, "$")}, count=100, block=block)
            for _, entries in rows or []:
                for entry_id, fields in entries:
                    after[partition] = entry_id.decode()
                    found.append((partition, entry_id.decode(), contract.decode_announce(fields)))
        if not found and self._partitions > 1:
            await asyncio.sleep(block_ms / 1000)
        return found

    async def beat(self, heartbeat: contract.Heartbeat, ttl_s: int) -> None:
        await self.redis.set(contract.heartbeat_key(heartbeat.worker), heartbeat.model_dump_json(), ex=ttl_s)

    async def heartbeat_of(self, worker: str) -> contract.Heartbeat | None:
        raw = await self.redis.get(contract.heartbeat_key(worker))
        return contract.Heartbeat.model_validate_json(raw) if raw else None

    # -- internals ---------------------------------------------------------------------------------

    async def retrying(self, call: Any) -> Any:
        """Run an idempotent Redis call, retrying transient failures with jittered backoff for up to
        `redis_retry_s`; a duplicate write is refused by its explicit id, so a retry is harmless."""
        backoff, deadline = Backoff(), time.monotonic() + self.settings.redis_retry_s
        while True:
            try:
                result = await call()
            except TRANSIENT_ERRORS as e:
                self.link.failed(e)
                delay = backoff.next_s()
                if time.monotonic() + delay > deadline:
                    raise
                await asyncio.sleep(delay)
                continue
            self.link.ok()
            return result

    def _claim(self, partition: int, entry_id: bytes, fields: contract.Fields, deliveries: int) -> Claim:
        try:
            return Claim(partition, entry_id, deliveries, contract.decode_announce(fields))
        except ContractError as e:
            return Claim(partition, entry_id, deliveries, None, error=str(e))

    async def _with_group(self, call: Any) -> Any:
        """Run a group command; if Redis lost the group (NOGROUP, or UNBLOCKED: the stream was deleted
        under a blocked read), re-create it and try once more."""
        try:
            return await call()
        except ResponseError as e:
            if not str(e).startswith(("NOGROUP", "UNBLOCKED")):
                raise
            log.warning("consumer group missing, re-creating it", error=str(e))
            await self.ensure_groups()
            return await call()

    async def _delivery_counts(self, key: str, entry_ids: list[bytes]) -> dict[bytes, int]:
        counts: dict[bytes, int] = {}
        for entry_id in entry_ids:
            rows = await self.retrying(
                lambda entry_id=entry_id: self.redis.xpending_range(
                    key, contract.WORKERS_GROUP, entry_id, entry_id, 1
                )
            )
            if rows:
                counts[entry_id] = int(rows[0]["times_delivered"])
        return counts

    async def _owner(self, key: str, entry_id: bytes) -> str | None:
        try:
            rows = await self.retrying(
                lambda: self.redis.xpending_range(key, contract.WORKERS_GROUP, entry_id, entry_id, 1)
            )
        except ResponseError:
            return None
        return rows[0]["consumer"].decode() if rows else None

    async def _unread(self, key: str, group: dict[str, Any]) -> int:
        """The group's `lag`; Redis leaves it unset after deletions in the range, so then count the
        entries after last-delivered-id (at most BACKLOG_SCAN entries: past that, "full" is all we need)."""
        if group.get("lag") is not None:
            return int(group["lag"])
        after = "(" + _str(group["last-delivered-id"])
        return len(await self.retrying(lambda: self.redis.xrange(key, after, "+", count=BACKLOG_SCAN)))

    async def _xadd_once(self, key: str, seq: int, fields: contract.Fields) -> bool:

        def add() -> Any:  # a pipeline empties itself when it runs: build one per attempt
            pipe = self.redis.pipeline(transaction=False)
            pipe.xadd(key, fields, id=contract.entry_id(seq))
            pipe.expire(key, self._live_ttl_s())
            return pipe.execute()

        try:
            await self.retrying(add)
        except ResponseError as e:
            if "equal or smaller" in str(e):
                return False
            raise
        return True

    async def _xread(self, key: str, after_seq: int, count: int, block_ms: int | None) -> list[Any]:
        rows = await self.retrying(
            lambda: self.redis.xread({key: contract.entry_id(after_seq)}, count=count, block=block_ms)
        )
        if not rows:
            return []
        if isinstance(rows, dict):
            return list(next(iter(rows.values()))[0])
        return list(rows[0][1])

    def _live_ttl_s(self) -> int:
        """A live session's keys outlive its longest possible audio plus the retention TTL."""
        return int(self.settings.max_session_s) + self.settings.session_ttl_s


def _now_ms() -> int:
    return int(time.time() * 1000)


def _str(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _id_tuple(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)
