"""The one module that works below rq's public API. Written against rq 3.0 (pinned `rq>=3.0,<3.1`).

rq stays the queue of record: every job is a real rq job (`rq:job:<id>` hash, made from rq's own
`Job.create(...).to_dict()`), queued in a real rq queue, held in rq's StartedJobRegistry with an rq
Execution while a worker has it, and finished into rq's Finished/Failed/Canceled registries with an
rq Result. So `rq info`, rq-dashboard, and rq's own abandoned-job detection and retries
(`StartedJobRegistry.cleanup`, run by the workers' maintenance) see our jobs exactly as rq's own
workers would leave them.

What rq does per job in several blocking round trips, the scripts below do per *batch* in one Lua
call each, atomically with this service's own event writes. Each Lua helper names the rq 3.0 code
it mirrors:

  rq_enqueue         Queue.enqueue_call -> Queue._enqueue_async_job (_prepare_for_queue, _persist_job,
                     push_job_id) and Queue.enqueue_job's `SADD rq:queues`
  rq_start           Queue.dequeue_any (pop, skip jobs whose hash is gone) + executions.prepare_execution
                     (Execution.create, ExecutionRegistry.add, StartedJobRegistry.add_execution, the
                     worker's execution index) + BaseWorker.prepare_job_execution (Job.heartbeat,
                     Job.prepare_for_execution, PERSIST). Popping and registering in one atomic step
                     replaces rq's intermediate list: a taken job is always in StartedJobRegistry.
  rq_end_execution   executions.cleanup_execution (Execution.delete)
  rq_succeeded       BaseWorker.handle_job_success (Job._handle_success, Result.create SUCCESSFUL,
                     FinishedJobRegistry.add, Job.cleanup); our jobs have no dependents.
  rq_failed          BaseWorker.handle_job_failure without retry (status FAILED, or STOPPED for a job
                     stopped on request), FailedJobRegistry.add, Result.create_failure, Job.cleanup
  rq_canceled        Job.cancel (status CANCELED, removed from its queue, CanceledJobRegistry.add)
  rq_requeue         Queue._enqueue_job(at_front=True) after cleanup_execution
  rq_heartbeat       BaseWorker.maintain_heartbeats (Execution.heartbeat, Job.heartbeat)

`tests/test_rq_contract.py` runs a burst worker with a fake engine against real valkey and reads
the outcome back through rq's public API; it fails loudly when rq changes any of this.
"""

from __future__ import annotations

import base64
import hashlib
import json
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone

import redis
from rq import Callback, Queue, Retry
from rq.defaults import RQ_KEY_PREFIX
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.utils import utcformat

from . import redis_layout as layout

RQ_VERSION_WRITTEN_AGAINST = (3, 0)
QUEUE_KEY_PREFIX = Queue.redis_queue_namespace_prefix  # "rq:queue:"
QUEUES_KEY = Queue.redis_queues_keys  # "rq:queues"


def check_rq_version() -> None:
    """Refuse to run on an rq whose internals these scripts were not written against."""
    import rq

    major_minor = tuple(int(part) for part in rq.__version__.split(".")[:2])
    if major_minor != RQ_VERSION_WRITTEN_AGAINST:
        raise RuntimeError(
            f"florence2-serve's queue scripts mirror rq {'.'.join(map(str, RQ_VERSION_WRITTEN_AGAINST))}.x "
            f"internals; rq {rq.__version__} is installed (pip install 'rq>=3.0,<3.1')"
        )


def queue_key(queue_name: str) -> str:
    return QUEUE_KEY_PREFIX + queue_name


class Clock:
    """One instant in the forms rq stores: ISO text, float seconds, integer seconds."""

    __slots__ = ("iso", "ts", "int")

    def __init__(self, moment: datetime | None = None):
        moment = moment or datetime.now(timezone.utc)
        self.iso = utcformat(moment)
        self.ts = moment.timestamp()
        self.int = int(self.ts)


# --------------------------------------------------------------------------------------------
# Lua. One library of helpers, prepended to each script (a script is compiled once per server).
# --------------------------------------------------------------------------------------------

_LIBRARY = r"""
-- Set by every entry point from its first two arguments (Redis runs one function at a time).
local RQ, F2S, RQ_QUEUE
local published = {}
local TERMINAL = {SUCCEEDED = true, FAILED = true, CANCELLED = true, EXPIRED = true}

local function enter(args)
  RQ, F2S = args[1], args[2]
  RQ_QUEUE = RQ .. ':queue:'
  published = {}
end

-- ---- this service's own keys (layout: common/redis_layout.py) ------------------------------

-- Append an event to the job's stream and to this call's notification.
local function append(id, etype, state, time, err, result)
  local fields = {'type', etype, 'state', state, 'time', time}
  if result ~= '' then fields[#fields + 1] = 'result'; fields[#fields + 1] = result end
  if err ~= '' then fields[#fields + 1] = 'error'; fields[#fields + 1] = err end
  local eid = redis.call('XADD', F2S .. ':events:' .. id, '*', unpack(fields))
  local n = #published
  published[n + 1] = id; published[n + 2] = eid; published[n + 3] = etype; published[n + 4] = state
  published[n + 5] = time; published[n + 6] = err; published[n + 7] = result
  return eid
end

local function set_state(id, state, err)
  if err ~= '' then
    redis.call('HSET', F2S .. ':job:' .. id, 'state', state, 'error', err)
  else
    redis.call('HSET', F2S .. ':job:' .. id, 'state', state)
  end
end

-- A job that has written its terminal event: its image goes, the rest lives `ttl` seconds more.
local function end_job(id, ttl)
  local jkey = F2S .. ':job:' .. id
  redis.call('DEL', F2S .. ':image:' .. id, F2S .. ':cancel:' .. id)
  redis.call('EXPIRE', jkey, ttl)
  redis.call('EXPIRE', F2S .. ':events:' .. id, ttl)
  local rid = redis.call('HGET', jkey, 'request_id')
  if rid and rid ~= '' then redis.call('EXPIRE', F2S .. ':request:' .. rid, ttl) end
end

local function finish_event(id, etype, state, time, err, ttl)
  append(id, etype, state, time, err, '')
  set_state(id, state, err)
  end_job(id, ttl)
end

local function job_state(id)
  return redis.call('HGET', F2S .. ':job:' .. id, 'state')
end

local function publish()
  if #published > 0 then redis.call('PUBLISH', F2S .. ':notify', cjson.encode(published)) end
end

local function ring(wake)
  if redis.call('LLEN', wake) == 0 then redis.call('RPUSH', wake, 1) end
end

-- ---- rq 3.0 (see the module docstring for what each mirrors) ---------------------------------

local function rq_enqueue(id, qkey, fields, ttl)
  local jkey = RQ .. ':job:' .. id
  redis.call('SADD', RQ .. ':queues', qkey)
  redis.call('HSET', jkey, unpack(fields))
  if ttl > 0 then redis.call('EXPIRE', jkey, ttl) end
  redis.call('RPUSH', qkey, id)
end

local function rq_start(id, qname, exec, worker, iso, ts, now, ttl)
  local composite = id .. ':' .. exec
  local ekey = RQ .. ':execution:' .. composite
  redis.call('HSET', ekey, 'id', exec, 'job_id', id, 'created_at', ts, 'last_heartbeat', ts,
             'worker_name', worker)
  redis.call('EXPIRE', ekey, ttl)
  local xkey = RQ .. ':executions:' .. id
  redis.call('ZADD', xkey, now + ttl + 60, exec)
  redis.call('EXPIRE', xkey, ttl + 60)
  redis.call('ZADD', RQ .. ':wip:' .. qname, now + ttl, composite)
  redis.call('SADD', RQ .. ':worker:' .. worker .. ':executions', composite)
  local jkey = RQ .. ':job:' .. id
  redis.call('HSET', jkey, 'last_heartbeat', iso, 'status', 'started', 'started_at', iso,
             'worker_name', worker)
  redis.call('PERSIST', jkey)
end

local function rq_end_execution(id, qname, exec, worker)
  local composite = id .. ':' .. exec
  redis.call('DEL', RQ .. ':execution:' .. composite)
  redis.call('ZREM', RQ .. ':wip:' .. qname, composite)
  redis.call('ZREM', RQ .. ':executions:' .. id, exec)
  redis.call('SREM', RQ .. ':worker:' .. worker .. ':executions', composite)
end

local function rq_result(id, rtype, worker, exec, started, ended, exc, ttl)
  local rkey = RQ .. ':results:' .. id
  if exc ~= '' then
    redis.call('XADD', rkey, 'MAXLEN', '~', 10, '*', 'type', rtype, 'worker_name', worker,
               'exc_string', exc, 'execution_id', exec, 'execution_started_at', started,
               'execution_ended_at', ended)
  else
    redis.call('XADD', rkey, 'MAXLEN', '~', 10, '*', 'type', rtype, 'worker_name', worker,
               'execution_id', exec, 'execution_started_at', started, 'execution_ended_at', ended)
  end
  redis.call('EXPIRE', rkey, ttl)
end

-- Our jobs never have dependents or dependencies, so Job.cleanup's EXPIREs of those keys are moot.
local function rq_succeeded(id, qname, exec, worker, iso, now, ended, started, ttl)
  local jkey = RQ .. ':job:' .. id
  redis.call('HSET', jkey, 'status', 'finished', 'ended_at', iso, 'last_heartbeat', iso)
  rq_result(id, 1, worker, exec, started, ended, '', ttl)
  redis.call('ZADD', RQ .. ':finished:' .. qname, now + ttl, id)
  redis.call('EXPIRE', jkey, ttl)
  rq_end_execution(id, qname, exec, worker)
end

local function rq_failed(id, qname, exec, worker, status, exc, iso, now, ended, started, ttl)
  local jkey = RQ .. ':job:' .. id
  redis.call('HSET', jkey, 'status', status, 'ended_at', iso, 'last_heartbeat', iso)
  rq_end_execution(id, qname, exec, worker)
  redis.call('EXPIRE', jkey, ttl)
  redis.call('ZADD', RQ .. ':failed:' .. qname, now + ttl, id)
  rq_result(id, 2, worker, exec, started, ended, exc, ttl)
end

local function rq_canceled(id, qkey, qname, now)
  redis.call('HSET', RQ .. ':job:' .. id, 'status', 'canceled')
  redis.call('LREM', qkey, 0, id)
  redis.call('ZADD', RQ .. ':canceled:' .. qname, now, id)
end

local function rq_requeue(id, qkey, qname, exec, worker, iso)
  rq_end_execution(id, qname, exec, worker)
  redis.call('HSET', RQ .. ':job:' .. id, 'status', 'queued', 'enqueued_at', iso)
  redis.call('SADD', RQ .. ':queues', qkey)
  redis.call('LPUSH', qkey, id)
end
"""

# Fixed ARGV head of every script: ARGV[1] rq prefix, ARGV[2] our prefix. Script args follow.
_HEAD = 2

_ENQUEUE = r"""
-- ARGV (after the head): job_id, request_id, fingerprint, ttl, max_depth, queue key, wake key, image,
-- time, rq job template key, iso, n_queues, queue keys..., our record fields...
-- Returns {1, QUEUED event id} | {0, existing job id, same payload 0/1} | {-1} full | {-2} no template.
local a = _HEAD
local id, rid, fingerprint = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
local ttl, max_depth = tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
local qkey, wake, image, time = ARGV[a + 6], ARGV[a + 7], ARGV[a + 8], ARGV[a + 9]
local template, iso = ARGV[a + 10], ARGV[a + 11]
local i = a + 12
local n_queues = tonumber(ARGV[i]); i = i + 1
local first_queue = i
i = i + n_queues
if rid ~= '' then
  local existing = redis.call('GET', F2S .. ':request:' .. rid)
  if existing then
    local sep = string.find(existing, ' ', 1, true)
    local same = string.sub(existing, sep + 1) == fingerprint and 1 or 0
    return {0, string.sub(existing, 1, sep - 1), same}
  end
end
local depth = 0
for q = first_queue, first_queue + n_queues - 1 do depth = depth + redis.call('LLEN', ARGV[q]) end
if depth >= max_depth then return {-1} end
local fields = redis.call('HGETALL', template)
if #fields == 0 then return {-2} end
fields[#fields + 1] = 'created_at'; fields[#fields + 1] = iso
fields[#fields + 1] = 'enqueued_at'; fields[#fields + 1] = iso
if rid ~= '' then
  redis.call('SET', F2S .. ':request:' .. rid, id .. ' ' .. fingerprint, 'EX', ttl)
end
rq_enqueue(id, qkey, fields, ttl)
redis.call('SET', F2S .. ':image:' .. id, image, 'EX', ttl)
local jkey = F2S .. ':job:' .. id
redis.call('HSET', jkey, unpack(ARGV, i))
redis.call('EXPIRE', jkey, ttl)
local eid = append(id, 'QUEUED', 'QUEUED', time, '', '')
redis.call('EXPIRE', F2S .. ':events:' .. id, ttl)
ring(wake)
return {1, eid}
"""

_TAKE = r"""
-- Pop up to max_n ids from the queues (highest priority first) and start them in rq (the reliable
-- hand-off: from here on rq's StartedJobRegistry holds them). Jobs that must not run are closed
-- here instead: cancelled (CANCELLED), past their deadline (EXPIRED), data gone, or ended already
-- (a job whose terminal event is written never runs again). The rest stay QUEUED for their users
-- until the model starts them (PROGRESS writes STARTED). Returns {queue key, id, execution id,
-- spec JSON, image} per job handed to the worker.
-- ARGV: max_n, worker, worker_id, iso, ts, now, heartbeat ttl, execution id prefix, wake key,
-- result ttl, rq exc_string for "expired", rq exc_string for "data gone", queue keys...
local a = _HEAD
local max_n, worker, worker_id = tonumber(ARGV[a + 1]), ARGV[a + 2], ARGV[a + 3]
local iso, ts, now, hb_ttl = ARGV[a + 4], ARGV[a + 5], tonumber(ARGV[a + 6]), tonumber(ARGV[a + 7])
local exec_prefix, wake, ttl = ARGV[a + 8], ARGV[a + 9], tonumber(ARGV[a + 10])
local exc_expired, exc_gone = ARGV[a + 11], ARGV[a + 12]
local time = ts
local out = {}
local taken = 0
for q = a + 13, #ARGV do
  local qkey = ARGV[q]
  local qname = string.sub(qkey, #RQ_QUEUE + 1)
  while taken < max_n do
    local id = redis.call('LPOP', qkey)
    if not id then break end
    if redis.call('EXISTS', RQ .. ':job:' .. id) == 1 then
      taken = taken + 1
      local exec = exec_prefix .. taken
      rq_start(id, qname, exec, worker, iso, ts, now, hb_ttl)
      local record = redis.call('HMGET', F2S .. ':job:' .. id, 'spec', 'state', 'deadline')
      local spec, state, deadline = record[1], record[2], record[3]
      if not spec then
        rq_failed(id, qname, exec, worker, 'failed', exc_gone, iso, now, ts, ts, ttl)
      elseif state == 'SUCCEEDED' then
        rq_succeeded(id, qname, exec, worker, iso, now, ts, ts, ttl)
      elseif TERMINAL[state] then
        rq_failed(id, qname, exec, worker, 'failed', '', iso, now, ts, ts, ttl)
      elseif redis.call('EXISTS', F2S .. ':cancel:' .. id) == 1 then
        finish_event(id, 'CANCELLED', 'CANCELLED', time, 'cancelled before it ran', ttl)
        rq_failed(id, qname, exec, worker, 'stopped', '', iso, now, ts, ts, ttl)
      elseif deadline and tonumber(deadline) <= tonumber(ts) then
        finish_event(id, 'FAILED', 'EXPIRED', time, 'deadline passed before the job ran; it was not run', ttl)
        rq_failed(id, qname, exec, worker, 'failed', exc_expired, iso, now, ts, ts, ttl)
      else
        out[#out + 1] = {qkey, id, exec, spec, redis.call('GET', F2S .. ':image:' .. id) or ''}
      end
    end
  end
end
-- Jobs left behind: ring again so another idle worker wakes for them.
local left = false
for q = a + 13, #ARGV do
  if redis.call('LLEN', ARGV[q]) > 0 then left = true; break end
end
if left then ring(wake) else redis.call('DEL', wake) end
if taken > 0 then
  redis.call('HSET', RQ .. ':worker:' .. worker, 'state', 'busy')
  redis.call('EXPIRE', RQ .. ':worker:' .. worker .. ':executions', hb_ttl + 60)
end
publish()
return out
"""

_PROGRESS = r"""
-- A worker's progress: jobs the model started (STARTED) and jobs that ended (their events and rq's
-- bookkeeping in one atomic step, so a job whose terminal event is written is finished in rq too
-- and can never be found abandoned and run again).
-- ARGV: ttl, time, worker, iso, now, ts, seconds worked, our worker key, generate calls, worker id,
-- n started, the ids of the jobs the model started, then per ended job 9 fields: id, queue key,
-- execution id, outcome (ok | failed | stopped), state, error, result, started ts, rq exc_string.
local a = _HEAD
local ttl, time, worker, iso = tonumber(ARGV[a + 1]), ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
local now, ts = tonumber(ARGV[a + 5]), ARGV[a + 6]
local n_ok, n_failed, worked = 0, 0, tonumber(ARGV[a + 7])
local our_worker, calls, worker_id = ARGV[a + 8], tonumber(ARGV[a + 9]), ARGV[a + 10]
local n_started = tonumber(ARGV[a + 11])
for i = a + 12, a + 11 + n_started do
  local id = ARGV[i]
  local current = job_state(id)
  if current and not TERMINAL[current] then
    append(id, 'STARTED', 'RUNNING', time, '', '')
    redis.call('HSET', F2S .. ':job:' .. id, 'state', 'RUNNING', 'worker_id', worker_id)
  end
end
for i = a + 12 + n_started, #ARGV, 9 do
  local id, qkey, exec, outcome = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local state, err, result, started, exc = ARGV[i + 4], ARGV[i + 5], ARGV[i + 6], ARGV[i + 7], ARGV[i + 8]
  local qname = string.sub(qkey, #RQ_QUEUE + 1)
  local current = job_state(id)
  if current and not TERMINAL[current] then
    if outcome == 'ok' then
      append(id, 'RESULT', 'RUNNING', time, '', result)
      finish_event(id, 'DONE', 'SUCCEEDED', time, '', ttl)
    elseif state == 'CANCELLED' then
      finish_event(id, 'CANCELLED', 'CANCELLED', time, err, ttl)
    else
      finish_event(id, 'FAILED', state, time, err, ttl)
    end
  end
  if outcome == 'ok' then
    rq_succeeded(id, qname, exec, worker, iso, now, ts, started, ttl)
    n_ok = n_ok + 1
  else
    rq_failed(id, qname, exec, worker, outcome, exc, iso, now, ts, started, ttl)
    n_failed = n_failed + 1
  end
end
local wkey = RQ .. ':worker:' .. worker
if n_ok > 0 then redis.call('HINCRBY', wkey, 'successful_job_count', n_ok) end
if n_failed > 0 then redis.call('HINCRBY', wkey, 'failed_job_count', n_failed) end
if worked > 0 then redis.call('HINCRBYFLOAT', wkey, 'total_working_time', worked) end
if redis.call('EXISTS', our_worker) == 1 then
  redis.call('HINCRBY', our_worker, 'jobs_done', n_ok + n_failed)
  if calls > 0 then redis.call('HINCRBY', our_worker, 'generate_calls', calls) end
end
publish()
return n_ok + n_failed
"""

_REQUEUE = r"""
-- Put taken but unfinished jobs back at the front of their queues (a worker that is stopping).
-- ARGV: ttl, time, worker, iso, wake key, reason, then per job: id, queue key, execution id.
local a = _HEAD
local ttl, time, worker, iso, wake = tonumber(ARGV[a + 1]), ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5]
local reason = ARGV[a + 6]
local n = 0
for i = a + 7, #ARGV, 3 do
  local id, qkey, exec = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local state = job_state(id)
  if state and not TERMINAL[state] then
    rq_requeue(id, qkey, string.sub(qkey, #RQ_QUEUE + 1), exec, worker, iso)
    append(id, 'QUEUED', 'QUEUED', time, reason, '')
    set_state(id, 'QUEUED', '')
    n = n + 1
  end
end
if n > 0 then ring(wake) end
publish()
return n
"""

_HEARTBEAT = r"""
-- BaseWorker.maintain_heartbeats for every job a worker holds.
-- ARGV: iso, ts, now, ttl, then per job: id, queue key, execution id.
local a = _HEAD
local iso, ts, now, ttl = ARGV[a + 1], ARGV[a + 2], tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
for i = a + 5, #ARGV, 3 do
  local id, qkey, exec = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local composite = id .. ':' .. exec
  local ekey = RQ .. ':execution:' .. composite
  redis.call('HSET', ekey, 'last_heartbeat', ts)
  redis.call('EXPIRE', ekey, ttl)
  redis.call('ZADD', RQ .. ':wip:' .. string.sub(qkey, #RQ_QUEUE + 1), 'XX', now + ttl, composite)
  local xkey = RQ .. ':executions:' .. id
  redis.call('ZADD', xkey, 'XX', now + ttl + 60, exec)
  redis.call('EXPIRE', xkey, ttl + 60)
  local jkey = RQ .. ':job:' .. id
  if redis.call('HSET', jkey, 'last_heartbeat', iso) == 1 then redis.call('DEL', jkey) end
end
return 1
"""

_CANCEL = r"""
-- CancelJob: remove a queued job (it ends CANCELLED now), or flag a taken one for its worker.
-- ARGV: job_id, ttl, time, now. Returns {state after, 1 if this call cancelled or flagged it}.
local a = _HEAD
local id, ttl, time, now = ARGV[a + 1], tonumber(ARGV[a + 2]), ARGV[a + 3], tonumber(ARGV[a + 4])
local state = job_state(id)
if not state then return {'', 0} end
if TERMINAL[state] then return {state, 0} end
local qkey = redis.call('HGET', F2S .. ':job:' .. id, 'queue')
if qkey and redis.call('LREM', qkey, 0, id) > 0 then
  rq_canceled(id, qkey, string.sub(qkey, #RQ_QUEUE + 1), now)
  finish_event(id, 'CANCELLED', 'CANCELLED', time, 'cancelled while queued', ttl)
  publish()
  return {'CANCELLED', 1}
end
redis.call('SET', F2S .. ':cancel:' .. id, '1', 'EX', ttl)
return {state, 1}
"""

_APPEND = r"""
-- Append one event to a job that has not ended (the rq failure callback's path).
-- ARGV: job_id, type, state, time, error, ttl.
local a = _HEAD
local id, etype, state, time, err, ttl = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5], tonumber(ARGV[a + 6])
local current = job_state(id)
if not current or TERMINAL[current] then return 0 end
if TERMINAL[state] then
  finish_event(id, etype, state, time, err, ttl)
else
  append(id, etype, state, time, err, '')
  set_state(id, state, '')
end
publish()
return 1
"""


_ENTRY_POINTS = {"enqueue": _ENQUEUE, "take": _TAKE, "progress": _PROGRESS, "requeue": _REQUEUE,
                 "heartbeat": _HEARTBEAT, "cancel": _CANCEL, "append": _APPEND}


def _library() -> tuple[str, str, dict[str, str]]:
    """The Redis function library: (its code, its name, entry point -> function name).

    Names carry a digest of the code, so processes of different versions can share one Redis.
    """
    bodies = _LIBRARY + "".join(
        f"\nlocal function {name}_body(ARGV)\n  enter(ARGV)\n{body.replace('_HEAD', str(_HEAD))}\nend\n"
        for name, body in _ENTRY_POINTS.items())
    digest = hashlib.sha1(bodies.encode()).hexdigest()[:12]
    functions = {name: f"f2s_{name}_{digest}" for name in _ENTRY_POINTS}
    registrations = "".join(
        f"\nredis.register_function('{functions[name]}', function(keys, args) return {name}_body(args) end)"
        for name in _ENTRY_POINTS)
    return f"#!lua name=florence2_serve_{digest}\n{bodies}{registrations}\n", f"florence2_serve_{digest}", functions


LIBRARY_CODE, LIBRARY_NAME, FUNCTIONS = _library()
_PREFIX_ARGS = (RQ_KEY_PREFIX, layout.PREFIX)


def _missing_function(exc: redis.exceptions.ResponseError) -> bool:
    return "Function not found" in str(exc)


def run_script(connection: redis.Redis, name: str, args):
    """FCALL one of the library's entry points, loading the library first if Redis lacks it."""
    function = FUNCTIONS[name]
    try:
        return connection.fcall(function, 0, *_PREFIX_ARGS, *args)
    except redis.exceptions.ResponseError as exc:
        if not _missing_function(exc):
            raise
    connection.function_load(LIBRARY_CODE, replace=True)
    return connection.fcall(function, 0, *_PREFIX_ARGS, *args)


async def run_script_async(connection, name: str, args):
    """The same over a connection with `await execute(*command)` (server/redis_pipe.py)."""
    function = FUNCTIONS[name]
    try:
        return await connection.execute("FCALL", function, 0, *_PREFIX_ARGS, *args)
    except redis.exceptions.ResponseError as exc:
        if not _missing_function(exc):
            raise
    await connection.execute("FUNCTION", "LOAD", "REPLACE", LIBRARY_CODE)
    return await connection.execute("FCALL", function, 0, *_PREFIX_ARGS, *args)


# --------------------------------------------------------------------------------------------
# The rq job hash, made by rq itself.
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class JobOptions:
    """What the front end sets on every rq job (rq's own enqueue_call arguments)."""

    timeout: int
    ttl: int
    max_retries: int


class JobTemplates:
    """The rq job hash of our jobs, made by rq's `Job.create(...).to_dict()`, one per queue.

    Every one of our jobs calls the same function with the same (no) arguments, so the hash differs
    between jobs only in its two timestamps, which the enqueue script fills in. The rest is kept in
    Redis under a key named by its content (so front ends with other settings never share one) and
    copied by the script: a submit sends one key name instead of ~20 fields.
    """

    PER_JOB = ("created_at", "enqueued_at")

    def __init__(self, options: JobOptions):
        self.options = options
        self._fields: dict[str, dict] = {}
        self._keys: dict[str, str] = {}

    def key(self, queue_name: str) -> str:
        found = self._keys.get(queue_name)
        if found is None:
            fields = self.fields(queue_name)
            digest = hashlib.sha1(repr(sorted(fields.items())).encode()).hexdigest()[:16]
            found = self._keys[queue_name] = f"{layout.PREFIX}:rq-template:{digest}"
        return found

    def fields(self, queue_name: str) -> dict:
        found = self._fields.get(queue_name)
        if found is None:
            found = self._fields[queue_name] = self._build(queue_name)
        return found

    async def store(self, connection, queue_name: str) -> None:
        flat = [item for pair in self.fields(queue_name).items() for item in pair]
        await connection.execute("HSET", self.key(queue_name), *flat)

    def _build(self, queue_name: str) -> dict:
        options = self.options
        job = Job.create(
            layout.JOB_FUNCTION, connection=redis.Redis(), serializer=JSONSerializer, id="template",
            timeout=options.timeout or -1, result_ttl=options.ttl, failure_ttl=options.ttl, ttl=options.ttl,
            retry=Retry(max=options.max_retries, enqueue_at_front=True) if options.max_retries else None,
            on_failure=Callback(layout.FAILURE_CALLBACK), origin=queue_name,
        )  # Job.create needs a connection object but does no I/O
        job._status = "queued"  # what Queue._prepare_for_queue sets
        return {key: value for key, value in job.to_dict().items()
                if key not in self.PER_JOB and value is not None and value != ""}


def encode_exc_string(text: str) -> str:
    """rq's Result keeps failure text as base64(zlib(text)) (Result.serialize)."""
    return base64.b64encode(zlib.compress(text.encode())).decode() if text else ""


# --------------------------------------------------------------------------------------------
# Python side of each script: argument layout in, typed reply out.
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Enqueued:
    job_id: str
    created: bool  # False: request_id named an existing job
    queued_event_id: str = ""
    same_payload: bool = True  # for an existing job: was it submitted with this payload?


class QueueFull(Exception):
    """The model's queues hold max_queue_depth jobs; the message says so and advises a retry."""


async def enqueue(connection, record: layout.JobRecord, image: bytes, payload_fingerprint: str, *,
                  ttl: int, max_depth: int, templates: JobTemplates, priority: int) -> Enqueued:
    """Store the job and put it on its model's queue at `priority`, atomically; idempotent per request_id."""
    clock = Clock()
    queue_name = layout.queue_name(record.model, priority)
    record.queue = queue_key(queue_name)
    queues = layout.rq_queue_keys(record.model)
    args = [record.job_id, record.request_id, payload_fingerprint, ttl, max_depth, record.queue,
            layout.wake_key(record.model), image, repr(record.created), templates.key(queue_name), clock.iso,
            len(queues), *queues, *[item for pair in record.to_hash().items() for item in pair]]
    reply = await run_script_async(connection, "enqueue", args)
    if int(reply[0]) == -2:  # first job of this queue (or Redis lost its data): store the template
        await templates.store(connection, queue_name)
        reply = await run_script_async(connection, "enqueue", args)
    status = int(reply[0])
    if status == 1:
        return Enqueued(record.job_id, True, _text(reply[1]))
    if status == 0:
        return Enqueued(_text(reply[1]), False, same_payload=bool(int(reply[2])))
    raise QueueFull(f"queue of model {record.model!r} is full ({max_depth} jobs); retry with backoff")


@dataclass
class TakenJob:
    """A job a worker took: in rq's StartedJobRegistry until finished or requeued."""

    queue_key: str
    job_id: str
    execution_id: str
    record: layout.JobRecord
    image: bytes


_EXC_EXPIRED = encode_exc_string("deadline passed before the job ran; it was not run")
_EXC_GONE = encode_exc_string("job data expired before it ran")


def take(connection: redis.Redis, model: str, *, worker_name: str, worker_id: str, max_jobs: int,
         heartbeat_ttl: int, result_ttl: int, execution_prefix: str) -> list[TakenJob]:
    """Up to max_jobs jobs of `model`, highest priority first; [] when its queues are empty."""
    clock = Clock()
    reply = run_script(connection, "take", [
        max_jobs, worker_name, worker_id, clock.iso, repr(clock.ts), clock.int, heartbeat_ttl, execution_prefix,
        layout.wake_key(model), result_ttl, _EXC_EXPIRED, _EXC_GONE, *layout.rq_queue_keys(model)])
    taken = []
    for qkey, job_id, execution_id, spec, image in reply:
        job_id = _text(job_id)
        record = layout.JobRecord(**json.loads(spec), queue=_text(qkey))
        taken.append(TakenJob(_text(qkey), job_id, _text(execution_id), record, image))
    return taken


def _job_triples(jobs) -> list:
    return [item for job in jobs for item in (job.job_id, job.queue_key, job.execution_id)]


@dataclass
class Finished:
    """What became of a taken job: started (by the model), or ended ok | failed | stopped (on request)."""

    job: TakenJob
    outcome: str
    state: str = ""
    error: str = ""
    result_json: str = ""
    started_at: float = 0.0


def progress(connection: redis.Redis, ended: list[Finished], *, ttl: int, worker_name: str, worker_id: str,
             worked_s: float, counters: tuple[str, int] = ("", 0)) -> None:
    """Write the jobs the model started, then the jobs that ended (STARTED always goes first: a batch
    starts before it ends); `counters` = (our worker registration key, generate calls to add)."""
    if not ended:
        return
    clock = Clock()
    started = [item.job.job_id for item in ended if item.outcome == "started"]
    args = [ttl, repr(clock.ts), worker_name, clock.iso, clock.int, repr(clock.ts), repr(worked_s), *counters,
            worker_id, len(started), *started]
    for item in ended:
        if item.outcome == "started":
            continue
        job = item.job
        args += [job.job_id, job.queue_key, job.execution_id, item.outcome, item.state, item.error,
                 item.result_json, repr(item.started_at or clock.ts),
                 encode_exc_string(item.error) if item.outcome in ("failed", "stopped") else ""]
    run_script(connection, "progress", args)


def requeue(connection: redis.Redis, jobs: list[TakenJob], *, model: str, ttl: int, worker_name: str,
            reason: str = "back in the queue: the worker that had taken it stopped") -> int:
    """Put taken jobs back at the front of their queues (their QUEUED event says `reason`)."""
    if not jobs:
        return 0
    clock = Clock()
    return int(run_script(connection, "requeue", [ttl, repr(clock.ts), worker_name, clock.iso, layout.wake_key(model),
                                                reason, *_job_triples(jobs)]))


def heartbeat(connection: redis.Redis, jobs: list[TakenJob], *, ttl: int) -> None:
    if not jobs:
        return
    clock = Clock()
    run_script(connection, "heartbeat", [clock.iso, repr(clock.ts), clock.int, ttl, *_job_triples(jobs)])


async def cancel(connection, job_id: str, *, ttl: int) -> tuple[str, bool]:
    """(state after the call, whether this call cancelled the job or flagged it); ("", False) if unknown."""
    clock = Clock()
    state, acted = await run_script_async(connection, "cancel", [job_id, ttl, repr(clock.ts), clock.int])
    return _text(state), bool(int(acted))


def append_event(connection: redis.Redis, job_id: str, event_type: str, state: str, error: str, ttl: int) -> bool:
    """Append an event to a job that has not ended; False when it had ended (or is gone)."""
    clock = Clock()
    return bool(run_script(connection, "append", [job_id, event_type, state, repr(clock.ts), error, ttl]))


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
