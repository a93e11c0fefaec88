"""The Lua scripts of the Redis broker: every state change is one script, so it is atomic.

Every script takes ``ARGV[1]`` = the key prefix and ``ARGV[2]`` = ``keep_expired_s``, then its own
arguments. Key names come from :mod:`asyncserve.jobs.keys` through the generated prelude; field
names are those of ``keys.JOB_FIELDS`` (a test checks the scripts use no others). A lease's
fencing token is checked inside the script that uses it, and ``TIME`` (the Redis server's clock)
is the only clock.
"""

from __future__ import annotations

from string import Template

from asyncserve.jobs import keys

_PRELUDE = Template("""
local P, KEEP = ARGV[1], tonumber(ARGV[2])
local MARGIN = 60  -- seconds a record outlives its last use, should expire() not run
local GROUP = '$group'
local function k(...) return table.concat({P, ...}, '$sep') end
local function job_key(id) return k('$job', id) end
local function idem_key(key, owner)  -- as keys.idempotency_key: one namespace per owner
  if owner then return k('$owned_idem', #owner, owner, key) end
  return k('$idem', key)
end
local function queue_key(model, priority) return k('$queue', model, priority) end
local function status_key(status) return k('$status', status) end
local function model_key(model) return k('$model', model) end
local function owner_key(owner) return k('$owner', owner) end
local QUEUES, MODELS, JOBS = k('$queues'), k('$models'), k('$jobs')
local LEASES, DELAYED, DUE, EVENTS = k('$leases'), k('$delayed'), k('$due'), k('$events')
local STATUSES = {'queued', 'running', 'succeeded', 'failed', 'cancelled', 'expired'}

local t = redis.call('TIME')
local NOW = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function num(x) return string.format('%.6f', x) end

local function set_status(id, jk, old, new)
  if old then redis.call('ZREM', status_key(old), id) end
  redis.call('ZADD', status_key(new), 0, id)
  redis.call('HSET', jk, 'status', new, 'updated_at', num(NOW))
  redis.call('PUBLISH', EVENTS, id)
end

local function held(jk, token)
  local status, current = unpack(redis.call('HMGET', jk, 'status', 'fencing_token'))
  return status == 'running' and current == token
end

local function push(id, jk)  -- to the back of its queue stream
  local q = redis.call('HGET', jk, 'queue')
  redis.call('HSET', jk, 'entry', redis.call('XADD', q, '*', '$stream_id', id))
end

local function leave_queues(id, jk)  -- out of its stream, the leases and the delayed retries
  local q, e = unpack(redis.call('HMGET', jk, 'queue', 'entry'))
  if e then
    redis.call('XACK', q, GROUP, e)
    redis.call('XDEL', q, e)
    redis.call('HDEL', jk, 'entry')
  end
  redis.call('ZREM', LEASES, id)
  redis.call('ZREM', DELAYED, id)
  redis.call('HDEL', jk, 'lease_owner', 'lease_expires_at')
end

local function keep_for(jk, seconds)  -- a safety net: Redis drops the record itself if expire() never runs
  local ms = math.ceil((seconds + MARGIN) * 1000)
  redis.call('PEXPIRE', jk, ms)
  local idem, owner = unpack(redis.call('HMGET', jk, 'idempotency_key', 'owner'))
  if idem then redis.call('PEXPIRE', idem_key(idem, owner), ms) end
end

local function finish(id, jk, old, new)
  leave_queues(id, jk)
  local ttl = tonumber(redis.call('HGET', jk, 'ttl_s'))
  redis.call('HSET', jk, 'finished_at', num(NOW))
  redis.call('ZADD', DUE, num(NOW + ttl), id)
  keep_for(jk, ttl + KEEP)
  set_status(id, jk, old, new)
end

local function requeue(id, jk, not_before)
  leave_queues(id, jk)
  redis.call('HSET', jk, 'not_before', num(not_before))
  local deadline = redis.call('HGET', jk, 'deadline_at')
  if deadline then redis.call('ZADD', DUE, deadline, id) end
  if not_before <= NOW then push(id, jk) else redis.call('ZADD', DELAYED, num(not_before), id) end
  set_status(id, jk, 'running', 'queued')
end

local function purge(id, jk)
  local status, model, idem, owner = unpack(redis.call('HMGET', jk, 'status', 'model', 'idempotency_key', 'owner'))
  redis.call('DEL', jk)
  if idem and redis.call('GET', idem_key(idem, owner)) == id then redis.call('DEL', idem_key(idem, owner)) end
  redis.call('ZREM', JOBS, id)
  redis.call('ZREM', DUE, id)
  if model then redis.call('ZREM', model_key(model), id) end
  if owner then redis.call('ZREM', owner_key(owner), id) end
  for _, s in ipairs(status and {status} or STATUSES) do redis.call('ZREM', status_key(s), id) end
  redis.call('PUBLISH', EVENTS, id)
end

local function tombstone(id, jk, old)
  leave_queues(id, jk)
  redis.call('HDEL', jk, 'inputs', 'result')
  if not redis.call('HGET', jk, 'finished_at') then redis.call('HSET', jk, 'finished_at', num(NOW)) end
  set_status(id, jk, old, 'expired')
  if KEEP <= 0 then
    purge(id, jk)
  else
    redis.call('ZADD', DUE, num(NOW + KEEP), id)
    keep_for(jk, KEEP)
  end
end
""").substitute(
    group=keys.GROUP, sep=keys.SEPARATOR, job=keys.JOB, idem=keys.IDEMPOTENCY, owned_idem=keys.OWNED_IDEMPOTENCY,
    queue=keys.QUEUE, status=keys.STATUS, model=keys.MODEL, owner=keys.OWNER, queues=keys.QUEUES, models=keys.MODELS,
    jobs=keys.JOBS, leases=keys.LEASES, delayed=keys.DELAYED, due=keys.DUE, events=keys.EVENTS,
    stream_id=keys.STREAM_ID_FIELD,
)  # fmt: skip

# ARGV[3] = max_queued or '', ARGV[4] = a JSON array of {id, model, priority, idem?, owner?, timeout?, fields}.
# Returns {'overloaded', queued, adding} or {'ok', {{created 0/1, HGETALL}, ...}}: all jobs or none.
ENQUEUE = """
local max_queued, specs = ARGV[3], cjson.decode(ARGV[4])
local function existing(spec)
  if not spec.idem then return nil end
  local id = redis.call('GET', idem_key(spec.idem, spec.owner))
  if id and redis.call('EXISTS', job_key(id)) == 1 then return id end
  return nil
end
local adding = 0
for _, spec in ipairs(specs) do if not existing(spec) then adding = adding + 1 end end
if max_queued ~= '' and adding > 0 then
  local queued = redis.call('ZCARD', status_key('queued'))
  if queued + adding > tonumber(max_queued) then return {'overloaded', queued, adding} end
end
local function create(spec)
  local id, jk, q = spec.id, job_key(spec.id), queue_key(spec.model, spec.priority)
  redis.call('HSET', jk, unpack(spec.fields))
  redis.call('HSET', jk, 'created_at', num(NOW), 'not_before', num(NOW), 'attempts', 0, 'fencing_token', 0,
             'dead_letter', 0, 'webhook_attempts', '[]', 'queue', q)
  if spec.timeout then
    redis.call('HSET', jk, 'deadline_at', num(NOW + spec.timeout))
    redis.call('ZADD', DUE, num(NOW + spec.timeout), id)
  end
  if redis.call('SADD', QUEUES, q) == 1 then redis.call('XGROUP', 'CREATE', q, GROUP, '0', 'MKSTREAM') end
  push(id, jk)
  redis.call('ZADD', JOBS, 0, id)
  redis.call('ZADD', model_key(spec.model), 0, id)
  redis.call('SADD', MODELS, spec.model)
  if spec.owner then redis.call('ZADD', owner_key(spec.owner), 0, id) end
  if spec.idem then redis.call('SET', idem_key(spec.idem, spec.owner), id) end
  set_status(id, jk, nil, 'queued')
  return redis.call('HGETALL', jk)
end
local out = {}
for _, spec in ipairs(specs) do
  local id = existing(spec)
  if id then out[#out + 1] = {0, redis.call('HGETALL', job_key(id))} else out[#out + 1] = {1, create(spec)} end
end
return {'ok', out}
"""

# ARGV[3] = worker id (the consumer), ARGV[4] = limit, ARGV[5] = lease_s, ARGV[6...] = models (none: all).
# Returns the granted jobs' HGETALLs, in order.
CLAIM = """
local consumer, limit, lease_s = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local models = {}
for i = 6, #ARGV do models[#models + 1] = ARGV[i] end
if #models == 0 then models = redis.call('SMEMBERS', MODELS) end
local wanted = {}
for _, m in ipairs(models) do wanted[m] = true end
local out = {}

local function grant(id, jk, old)
  local expires = NOW + lease_s
  redis.call('HINCRBY', jk, 'attempts', 1)
  redis.call('HINCRBY', jk, 'fencing_token', 1)
  redis.call('HSET', jk, 'lease_owner', consumer, 'lease_expires_at', num(expires), 'started_at', num(NOW))
  redis.call('ZADD', LEASES, num(expires), id)
  redis.call('ZREM', DUE, id)
  set_status(id, jk, old, 'running')
  out[#out + 1] = redis.call('HGETALL', jk)
end

-- Retries whose backoff is over go to the back of their queue, in the order they fell due.
for _, id in ipairs(redis.call('ZRANGEBYSCORE', DELAYED, '-inf', num(NOW), 'LIMIT', 0, 1000)) do
  redis.call('ZREM', DELAYED, id)
  if redis.call('HGET', job_key(id), 'status') == 'queued' then push(id, job_key(id)) end
end

-- 1. Jobs whose lease expired (a dead or stalled worker): taken back first, highest priority first.
local expired = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', LEASES, '-inf', num(NOW), 'LIMIT', 0, 1000)) do
  local f = redis.call('HMGET', job_key(id), 'status', 'model', 'priority', 'not_before')
  if f[1] ~= 'running' then redis.call('ZREM', LEASES, id)
  elseif wanted[f[2]] then expired[#expired + 1] = {id = id, priority = tonumber(f[3]), since = tonumber(f[4])} end
end
table.sort(expired, function(a, b)
  if a.priority ~= b.priority then return a.priority > b.priority end
  if a.since ~= b.since then return a.since < b.since end
  return a.id < b.id
end)
for _, job in ipairs(expired) do
  local id, jk = job.id, job_key(job.id)
  local attempts, max_attempts, owner, q, e = unpack(redis.call('HMGET', jk, 'attempts', 'max_attempts',
                                                                  'lease_owner', 'queue', 'entry'))
  if tonumber(attempts) >= tonumber(max_attempts) then
    redis.call('HSET', jk, 'dead_letter', 1, 'error', 'the lease of attempt ' .. attempts .. ' of ' ..
               max_attempts .. ' expired: worker ' .. owner .. ' stopped renewing it')
    finish(id, jk, 'running', 'failed')
  elseif #out < limit then
    redis.call('XCLAIM', q, GROUP, consumer, 0, e, 'JUSTID')  -- XPENDING shows the new holder
    grant(id, jk, 'running')
  end
end

-- 2. Queued jobs: priority 9 down to 0; within a priority, the oldest entries of all the models'
-- streams, found with XRANGE past the group's last-delivered id, then read with XREADGROUP.
local function last_delivered(q)
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', q)) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    if info['name'] == GROUP then return info['last-delivered-id'] end
  end
  return '0-0'
end
local function earlier(a, b)  -- by the entries' milliseconds, then job id (ids grow with time too)
  local ams, bms = tonumber(string.match(a[1], '^(%d+)-')), tonumber(string.match(b[1], '^(%d+)-'))
  if ams ~= bms then return ams < bms end
  return a[2][2] < b[2][2]
end
local function take(c)
  local jk = job_key(c.id)
  local status, entry, deadline = unpack(redis.call('HMGET', jk, 'status', 'entry', 'deadline_at'))
  if status == 'queued' and entry == c.entry then
    if deadline and tonumber(deadline) <= NOW then tombstone(c.id, jk, 'queued') else grant(c.id, jk, 'queued') end
  else  -- an entry its job no longer owns (the job was cancelled or requeued): drop it
    redis.call('XACK', c.queue, GROUP, c.entry)
    redis.call('XDEL', c.queue, c.entry)
  end
end
local function candidates(priority, room)
  -- Merge the streams' next entries, oldest first; what is taken of each stream stays a prefix
  -- of it, as XREADGROUP delivers.
  local streams = {}
  for _, m in ipairs(models) do
    local q = queue_key(m, priority)
    if redis.call('SISMEMBER', QUEUES, q) == 1 then
      local entries = redis.call('XRANGE', q, '(' .. last_delivered(q), '+', 'COUNT', room)
      if #entries > 0 then streams[#streams + 1] = {queue = q, entries = entries, next = 1} end
    end
  end
  local found = {}
  while #found < room do
    local best = nil
    for _, s in ipairs(streams) do
      local e = s.entries[s.next]
      if e and (best == nil or earlier(e, best.entries[best.next])) then best = s end
    end
    if best == nil then break end
    local e = best.entries[best.next]
    found[#found + 1] = {queue = best.queue, entry = e[1], id = e[2][2]}
    best.next = best.next + 1
  end
  return found
end
for priority = 9, 0, -1 do
  while #out < limit do
    local room = limit - #out
    local found = candidates(priority, room)
    if #found == 0 then break end
    local counts = {}
    for _, c in ipairs(found) do counts[c.queue] = (counts[c.queue] or 0) + 1 end
    for q, n in pairs(counts) do redis.call('XREADGROUP', 'GROUP', GROUP, consumer, 'COUNT', n, 'STREAMS', q, '>') end
    for _, c in ipairs(found) do take(c) end
  end
end
return out
"""

# ARGV[3] = job id, ARGV[4] = fencing token, ARGV[5] = the result's JSON. Returns 1, or 0 if stale.
COMPLETE = """
local id, jk = ARGV[3], job_key(ARGV[3])
if not held(jk, ARGV[4]) then return 0 end
redis.call('HSET', jk, 'result', ARGV[5])
finish(id, jk, 'running', 'succeeded')
return 1
"""

# ARGV[3] = job id, ARGV[4] = token, ARGV[5] = error, ARGV[6] = retry_in_s or '' (do not retry).
FAIL = """
local id, jk, retry_in_s = ARGV[3], job_key(ARGV[3]), ARGV[6]
if not held(jk, ARGV[4]) then return 0 end
redis.call('HSET', jk, 'error', ARGV[5])
local attempts, max_attempts = unpack(redis.call('HMGET', jk, 'attempts', 'max_attempts'))
if retry_in_s == '' or tonumber(attempts) >= tonumber(max_attempts) then
  redis.call('HSET', jk, 'dead_letter', retry_in_s == '' and 0 or 1)
  finish(id, jk, 'running', 'failed')
else
  requeue(id, jk, NOW + tonumber(retry_in_s))
end
return 1
"""

# ARGV[3] = job id, ARGV[4] = token. Back to the queue at once, the attempt not counted.
RELEASE = """
local id, jk = ARGV[3], job_key(ARGV[3])
if not held(jk, ARGV[4]) then return 0 end
redis.call('HINCRBY', jk, 'attempts', -1)
requeue(id, jk, NOW)
return 1
"""

# ARGV[3] = job id, ARGV[4] = token, ARGV[5] = lease_s.
RENEW = """
local id, jk = ARGV[3], job_key(ARGV[3])
if not held(jk, ARGV[4]) then return 0 end
local expires = NOW + tonumber(ARGV[5])
redis.call('HSET', jk, 'lease_expires_at', num(expires))
redis.call('ZADD', LEASES, num(expires), id)
local q, e, owner = unpack(redis.call('HMGET', jk, 'queue', 'entry', 'lease_owner'))
redis.call('XCLAIM', q, GROUP, owner, 0, e, 'JUSTID')  -- resets the entry's idle time in XPENDING
return 1
"""

# ARGV[3] = job id. Returns the job's HGETALL (empty if there is no such job).
CANCEL = """
local id, jk = ARGV[3], job_key(ARGV[3])
local status = redis.call('HGET', jk, 'status')
if status == 'queued' or status == 'running' then finish(id, jk, status, 'cancelled') end
return redis.call('HGETALL', jk)
"""

# ARGV[3] = job id, ARGV[4] = the attempt's JSON object, appended to the JSON array as text.
RECORD_ATTEMPT = """
local jk, attempt = job_key(ARGV[3]), ARGV[4]
local attempts = redis.call('HGET', jk, 'webhook_attempts')
if not attempts then return 0 end
if attempts == '[]' then
  attempts = '[' .. attempt .. ']'
else
  attempts = string.sub(attempts, 1, -2) .. ',' .. attempt .. ']'
end
redis.call('HSET', jk, 'webhook_attempts', attempts)
return 1
"""

# ARGV[3] = how many due jobs to look at. Returns {expired now, looked at}.
EXPIRE = """
local expired, seen = 0, 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', DUE, '-inf', num(NOW), 'LIMIT', 0, tonumber(ARGV[3]))) do
  seen = seen + 1
  local jk = job_key(id)
  local status = redis.call('HGET', jk, 'status')
  if not status or status == 'expired' then purge(id, jk)  -- a tombstone's time is up (or Redis dropped it)
  elseif status == 'running' then redis.call('ZREM', DUE, id)  -- a deadline only applies while queued
  else
    tombstone(id, jk, status)
    expired = expired + 1
  end
end
return {expired, seen}
"""

_BODIES = {
    "enqueue": ENQUEUE,
    "claim": CLAIM,
    "complete": COMPLETE,
    "fail": FAIL,
    "release": RELEASE,
    "renew": RENEW,
    "cancel": CANCEL,
    "record_attempt": RECORD_ATTEMPT,
    "expire": EXPIRE,
}
SCRIPTS = {name: _PRELUDE + body for name, body in _BODIES.items()}
"""Each script's full source (the prelude, then its body), by name."""
