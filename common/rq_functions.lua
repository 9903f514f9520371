-- florence2-serve's Redis function library (loaded once with FUNCTION LOAD, called with FCALL).
-- common/rq_bridge.py registers each entry point below under a name that carries a digest of
-- this file, and documents which rq 3.0 code each rq_* helper mirrors. Every entry point gets
-- ARGV = {rq key prefix, this service's key prefix, its own arguments...}.

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

-- Append an event to the job's stream and to this call's notification. `err` is an encoded JobError
-- (common/errors.py: JSON with reason and message), `result` a base64 florence2.v1.Result.
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

-- A stream that will not grow much more, re-encoded at its exact size. Redis allocates a stream's
-- first node at 4 KB whatever it holds; DUMP + RESTORE rebuilds it from the serialized entries
-- (same ids, same fields): rq's Result stream of a failed job goes from ~4.4 KB to ~0.4 KB.
local function compact_stream(key, ttl)
  local dumped = redis.call('DUMP', key)
  if dumped then redis.call('RESTORE', key, ttl * 1000, dumped, 'REPLACE') end
end

-- An ended job's events, folded into its record as one JSON field: [[id, type, state, time, error,
-- result], ...], and its stream deleted. A stream costs ~0.5 KB more than the same events in a hash
-- field, and an ended job is kept for the result TTL: at 1,000 jobs/s and 1 h that is 1.8 GB.
-- Readers take the stream while it exists and the field once it is gone (common/redis_layout.py).
local function fold_events(id, jkey)
  local ekey = F2S .. ':events:' .. id
  local folded = {}
  for _, entry in ipairs(redis.call('XRANGE', ekey, '-', '+')) do
    local fields, map = entry[2], {}
    for k = 1, #fields, 2 do map[fields[k]] = fields[k + 1] end
    folded[#folded + 1] = {entry[1], map.type, map.state, map.time, map.error or '', map.result or ''}
  end
  if #folded > 0 then redis.call('HSET', jkey, 'events', cjson.encode(folded)) end
  redis.call('DEL', ekey)
end

-- A job that has written its terminal event: its image goes, the rest lives `ttl` seconds more.
local function end_job(id, ttl)
  local jkey = F2S .. ':job:' .. id
  redis.call('DEL', F2S .. ':image:' .. id, F2S .. ':cancel:' .. id)
  redis.call('HDEL', jkey, 'queue')  -- only a job that can still be cancelled or requeued needs it
  fold_events(id, jkey)
  redis.call('EXPIRE', jkey, ttl)
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
  compact_stream(rkey, ttl)
end

-- Our jobs never have dependents or dependencies, so Job.cleanup's EXPIREs of those keys are moot.
-- A success writes no rq Result: our jobs return nothing to rq (the result is in the job's events),
-- rq shows the outcome from the job's status and registry, and a Result stream would be ~20 % of what
-- an ended job keeps in Redis. Failures keep theirs: it carries the reason (exc_string).
local function rq_succeeded(id, qname, exec, worker, iso, now, ended, started, ttl)
  local jkey = RQ .. ':job:' .. id
  redis.call('HSET', jkey, 'status', 'finished', 'ended_at', iso)
  -- What only a job that may still run (or fail) reads: its timeout, retries, failure callback.
  redis.call('HDEL', jkey, 'last_heartbeat', 'timeout', 'retries_left', 'retry_intervals',
             'enqueue_at_front_on_retry', 'failure_callback_name', 'failure_callback_timeout')
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

-- ---- entry point: enqueue ---------------------------------------------------
-- ARGV (after the head): job_id, request_id, fingerprint, ttl, max_depth, queue key, wake key, image,
-- time, rq job template key, iso, n_queues, queue keys..., our record fields...
-- Returns {1, QUEUED event id} | {0, existing job id, same payload 0/1} | {-1} full | {-2} no template.
local function enqueue_body(ARGV)
  enter(ARGV)
  local a = 2
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
end

-- ---- entry point: take ------------------------------------------------------
-- Pop up to max_n ids from the queues (highest priority first) and start them in rq (the reliable
-- hand-off: from here on rq's StartedJobRegistry holds them). Jobs that must not run are closed
-- here instead: cancelled (CANCELLED), past their deadline (EXPIRED), data gone, or ended already
-- (a job whose terminal event is written never runs again). The rest stay QUEUED for their users
-- until the model starts them (PROGRESS writes STARTED). Returns {queue key, id, execution id,
-- spec JSON, image} per job handed to the worker, and {'closed', id, state, reason, spec JSON} per job
-- this call ended instead (the worker counts them in its metrics).
-- Idle workers of the model are registered in a sorted set (member worker id, score the time their
-- registration lapses). A worker whose model is idle (mode 'idle') that gets nothing is registered;
-- any take unregisters its worker. A busy worker (mode 'busy') leaves up to `per idle` queued jobs
-- for each idle worker (its own batch size: workers of a model are alike), so that a job never waits
-- behind a running batch while another worker idles. The jobs it leaves are the first in priority and
-- queue order (they run at once on the idle workers; it takes the ones after them), it gets
-- {'deferred', n} for the n jobs it left that it could have taken, and it looks again later rather
-- than block on the wake list (whose token the idle workers need).
-- ARGV: max_n, worker, worker_id, iso, ts, now, heartbeat ttl, execution id prefix, wake key,
-- result ttl, rq exc_string for "expired", rq exc_string for "data gone", idle set key, idle until,
-- mode ('idle' | 'busy' | ''), jobs to leave per idle worker (busy mode), queue keys...
local function take_body(ARGV)
  enter(ARGV)
  local a = 2
  local max_n, worker, worker_id = tonumber(ARGV[a + 1]), ARGV[a + 2], ARGV[a + 3]
  local iso, ts, now, hb_ttl = ARGV[a + 4], ARGV[a + 5], tonumber(ARGV[a + 6]), tonumber(ARGV[a + 7])
  local exec_prefix, wake, ttl = ARGV[a + 8], ARGV[a + 9], tonumber(ARGV[a + 10])
  local exc_expired, exc_gone = ARGV[a + 11], ARGV[a + 12]
  local idle_key, idle_until, mode = ARGV[a + 13], ARGV[a + 14], ARGV[a + 15]
  local per_idle = tonumber(ARGV[a + 16])
  local first_queue = a + 17
  local time = ts
  local out = {}
  local taken, handed, deferred, skip = 0, 0, 0, 0
  redis.call('ZREM', idle_key, worker_id)
  -- Lapsed registrations (workers that died idle) go at every take, so the set never outgrows the live workers.
  redis.call('ZREMRANGEBYSCORE', idle_key, '-inf', '(' .. ts)
  if mode == 'busy' then
    local idle_others = redis.call('ZCARD', idle_key)
    if idle_others > 0 then
      local queued = 0
      for q = first_queue, #ARGV do queued = queued + redis.call('LLEN', ARGV[q]) end
      -- The jobs at the head (the highest priority, the oldest) are theirs: they run at once there.
      skip = math.min(queued, idle_others * per_idle)
      local share = queued - skip
      if share < max_n then
        deferred = math.min(max_n, queued) - share
        max_n = share
      end
    end
  end
  for q = first_queue, #ARGV do
    local qkey = ARGV[q]
    local qname = string.sub(qkey, #RQ_QUEUE + 1)
    while taken < max_n do
      local id
      if skip > 0 then
        local length = redis.call('LLEN', qkey)
        if skip >= length then skip = skip - length; break end
        id = redis.call('LINDEX', qkey, skip)
        redis.call('LREM', qkey, 1, id)
      else
        id = redis.call('LPOP', qkey)
      end
      if not id then break end
      if redis.call('EXISTS', RQ .. ':job:' .. id) == 1 then
        taken = taken + 1
        local exec = exec_prefix .. taken
        rq_start(id, qname, exec, worker, iso, ts, now, hb_ttl)
        local record = redis.call('HMGET', F2S .. ':job:' .. id, 'spec', 'state', 'deadline')
        local spec, state, deadline = record[1], record[2], record[3]
        if not spec then
          rq_failed(id, qname, exec, worker, 'failed', exc_gone, iso, now, ts, ts, ttl)
          out[#out + 1] = {'closed', id, 'FAILED', 'JOB_DATA_EXPIRED', ''}
        elseif state == 'SUCCEEDED' then
          rq_succeeded(id, qname, exec, worker, iso, now, ts, ts, ttl)
        elseif TERMINAL[state] then
          rq_failed(id, qname, exec, worker, 'failed', '', iso, now, ts, ts, ttl)
        elseif redis.call('EXISTS', F2S .. ':cancel:' .. id) == 1 then
          finish_event(id, 'CANCELLED', 'CANCELLED', time, '{"reason":"CANCELLED","message":"cancelled before it ran"}', ttl)
          rq_failed(id, qname, exec, worker, 'stopped', '', iso, now, ts, ts, ttl)
          out[#out + 1] = {'closed', id, 'CANCELLED', 'CANCELLED', spec}
        elseif deadline and tonumber(deadline) <= tonumber(ts) then
          finish_event(id, 'EXPIRED', 'EXPIRED', time,
            '{"reason":"DEADLINE_EXCEEDED","message":"deadline passed before the job ran; it was not run"}', ttl)
          rq_failed(id, qname, exec, worker, 'failed', exc_expired, iso, now, ts, ts, ttl)
          out[#out + 1] = {'closed', id, 'EXPIRED', 'DEADLINE_EXCEEDED', spec}
        else
          out[#out + 1] = {qkey, id, exec, spec, redis.call('GET', F2S .. ':image:' .. id) or ''}
          handed = handed + 1
        end
      end
    end
  end
  -- Jobs left behind: ring again so another idle worker wakes for them.
  local left = false
  for q = first_queue, #ARGV do
    if redis.call('LLEN', ARGV[q]) > 0 then left = true; break end
  end
  if left then ring(wake) else redis.call('DEL', wake) end
  if mode == 'idle' and handed == 0 then redis.call('ZADD', idle_key, idle_until, worker_id) end
  if deferred > 0 then out[#out + 1] = {'deferred', deferred} end
  if taken > 0 then
    redis.call('HSET', RQ .. ':worker:' .. worker, 'state', 'busy')
    redis.call('EXPIRE', RQ .. ':worker:' .. worker .. ':executions', hb_ttl + 60)
  end
  publish()
  return out
end

-- ---- entry point: progress --------------------------------------------------
-- A worker's progress: jobs the model started (STARTED) and jobs that ended (their events and rq's
-- bookkeeping in one atomic step, so a job whose terminal event is written is finished in rq too
-- and can never be found abandoned and run again).
-- A worker whose model has nothing left to do after these jobs, and that holds no other job, registers
-- as idle (see take).
-- ARGV: ttl, time, worker, iso, now, ts, seconds worked, our worker key, generate calls, worker id,
-- idle set key ('': never register, e.g. while the worker drains), idle until, n started, the ids of the jobs the model
-- started, then per ended job 9 fields: id, queue key, execution id, outcome (ok | failed | stopped),
-- state, error, result, started ts, rq exc_string.
local function progress_body(ARGV)
  enter(ARGV)
  local a = 2
  local ttl, time, worker, iso = tonumber(ARGV[a + 1]), ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local now, ts = tonumber(ARGV[a + 5]), ARGV[a + 6]
  local n_ok, n_failed, worked = 0, 0, tonumber(ARGV[a + 7])
  local our_worker, calls, worker_id = ARGV[a + 8], tonumber(ARGV[a + 9]), ARGV[a + 10]
  local idle_key, idle_until = ARGV[a + 11], ARGV[a + 12]
  local n_started = tonumber(ARGV[a + 13])
  for i = a + 14, a + 13 + n_started do
    local id = ARGV[i]
    local current = job_state(id)
    if current and not TERMINAL[current] then
      append(id, 'STARTED', 'RUNNING', time, '', '')
      redis.call('HSET', F2S .. ':job:' .. id, 'state', 'RUNNING', 'worker_id', worker_id)
    end
  end
  for i = a + 14 + n_started, #ARGV, 9 do
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
        finish_event(id, state == 'EXPIRED' and 'EXPIRED' or 'FAILED', state, time, err, ttl)
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
  -- Only while it holds no job: its fetcher may have taken one since the worker found itself idle.
  if idle_key ~= '' and redis.call('SCARD', RQ .. ':worker:' .. worker .. ':executions') == 0 then
    redis.call('ZADD', idle_key, idle_until, worker_id)
  end
  publish()
  return n_ok + n_failed
end

-- ---- entry point: requeue ---------------------------------------------------
-- Put taken but unfinished jobs back at the front of their queues (a worker that is stopping).
-- ARGV: ttl, time, worker, iso, wake key, reason, then per job: id, queue key, execution id.
local function requeue_body(ARGV)
  enter(ARGV)
  local a = 2
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
end

-- ---- entry point: heartbeat -------------------------------------------------
-- BaseWorker.maintain_heartbeats for every job a worker holds.
-- ARGV: iso, ts, now, ttl, then per job: id, queue key, execution id.
local function heartbeat_body(ARGV)
  enter(ARGV)
  local a = 2
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
end

-- ---- entry point: cancel ----------------------------------------------------
-- CancelJob: remove a queued job (it ends CANCELLED now), or flag a taken one for its worker.
-- ARGV: job_id, ttl, time, now. Returns {state after, 1 if this call cancelled or flagged it}.
local function cancel_body(ARGV)
  enter(ARGV)
  local a = 2
  local id, ttl, time, now = ARGV[a + 1], tonumber(ARGV[a + 2]), ARGV[a + 3], tonumber(ARGV[a + 4])
  local state = job_state(id)
  if not state then return {'', 0} end
  if TERMINAL[state] then return {state, 0} end
  local qkey = redis.call('HGET', F2S .. ':job:' .. id, 'queue')
  if qkey and redis.call('LREM', qkey, 0, id) > 0 then
    rq_canceled(id, qkey, string.sub(qkey, #RQ_QUEUE + 1), now)
    finish_event(id, 'CANCELLED', 'CANCELLED', time, '{"reason":"CANCELLED","message":"cancelled while queued"}', ttl)
    publish()
    return {'CANCELLED', 1}
  end
  redis.call('SET', F2S .. ':cancel:' .. id, '1', 'EX', ttl)
  return {state, 1}
end

-- ---- entry point: append ----------------------------------------------------
-- Append one event to a job that has not ended (the rq failure callback's path).
-- ARGV: job_id, type, state, time, error, ttl.
local function append_body(ARGV)
  enter(ARGV)
  local a = 2
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
end
