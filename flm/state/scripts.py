"""The Lua scripts that change shared state in Redis, atomically and in one round trip each.

Names (all under one prefix, ``flm:`` by default; the database number of the URL separates
deployments):

- ``flm:b:<bucket>``  hash ``t`` (tokens), ``u`` (last update, epoch s): a token bucket of
  ``burst`` tokens refilled at ``rpm``/60 a second; expires once it would be full again;
- ``flm:f:<ip>``  hash ``n``, ``t``: auth failures and when the last one happened (fades after
  the failure window);
- ``flm:s:<ip>``  hash ``n``, ``t``: an intrusion score (fades after the score window);
- ``flm:blocks``  hash ``<ip>`` → ``reason|until|since`` (``until`` empty: permanent); an
  expired entry is dropped by the next script that reads it;
- ``flm:revoked``  set of revoked key ids;
- ``flm:keys``  hash ``<key id>`` → the key's record (JSON: Argon2id hash, label, limits,
  creation and revocation times; never a plaintext key);
- ``flm:policy``  the shared security policy (JSON);
- channel ``flm:events``: JSON messages ``block``, ``unblock``, ``revoke``, ``keys`` and
  ``policy``, each naming the process (``o``) that sent it.

Times come from the caller (every FLM process keeps its clock in sync, as TLS and the audit
trail already ask), so tests can move them; numbers travel as strings (a Lua number returned
to Redis would be cut to an integer).
"""

from __future__ import annotations

_COMMON = r"""
local function num(x)
  return string.format('%.17g', x)
end

-- One token from a bucket; the seconds to wait for one (0: taken).
local function take(key, rpm, burst, now)
  if rpm <= 0 or burst <= 0 then return 0 end
  local rate = rpm / 60.0
  local v = redis.call('HMGET', key, 't', 'u')
  local tokens, updated = tonumber(v[1]), tonumber(v[2])
  if tokens == nil or updated == nil then
    tokens = burst
    updated = now
  end
  if now > updated then
    tokens = tokens + (now - updated) * rate
    updated = now
  end
  if tokens > burst then tokens = burst end
  local wait = 0
  if tokens >= 1 then
    tokens = tokens - 1
  else
    wait = (1 - tokens) / rate
  end
  redis.call('HSET', key, 't', num(tokens), 'u', num(updated))
  redis.call('PEXPIRE', key, math.ceil((burst - tokens) / rate * 1000) + 1000)
  return wait
end

-- The block of ip now, or nil (an expired one is dropped).
local function blocked(blocks, ip, now)
  if ip == '' then return nil end
  local raw = redis.call('HGET', blocks, ip)
  if not raw then return nil end
  local reason, untl, since = string.match(raw, '^(.-)|(.-)|(.*)$')
  if untl ~= '' and tonumber(untl) <= now then
    redis.call('HDEL', blocks, ip)
    return nil
  end
  return {reason, untl, since}
end

-- Block ip (never shortening a longer block); the block in force and whether it changed.
local function put_block(blocks, channel, origin, ip, reason, untl, now)
  local current = blocked(blocks, ip, now)
  if current then
    if current[2] == '' or (untl ~= '' and tonumber(current[2]) >= tonumber(untl)) then
      return current, false
    end
  end
  local since = num(now)
  redis.call('HSET', blocks, ip, reason .. '|' .. untl .. '|' .. since)
  redis.call('PUBLISH', channel, cjson.encode({o = origin, t = 'block', ip = ip,
    reason = reason, ['until'] = untl, since = since}))
  return {reason, untl, since}, true
end
"""

#: One request's shared checks: the address's block, the key's revocation, the per-address
#: bucket, the policy's per-key bucket and the key's own bucket, in that order (the first
#: refusal stops: later buckets are not charged).
#: KEYS: blocks, revoked, ip bucket, key bucket, own bucket.
#: ARGV: now, ip, key id ('' = none), ip rpm, ip burst, key rpm, key burst,
#: own rpm, own burst (0 = no such limit), check the address's block (0/1).
#: Returns {'block', reason, until, since} or {'ok', ip wait, key wait, own wait, revoked}.
ADMIT = (
    _COMMON
    + r"""
local now = tonumber(ARGV[1])
local block = nil
if ARGV[10] == '1' then block = blocked(KEYS[1], ARGV[2], now) end
if block then return {'block', block[1], block[2], block[3]} end
if ARGV[3] ~= '' and redis.call('SISMEMBER', KEYS[2], ARGV[3]) == 1 then
  return {'ok', '0', '0', '0', '1'}
end
local w = take(KEYS[3], tonumber(ARGV[4]), tonumber(ARGV[5]), now)
if w > 0 then return {'ok', num(w), '0', '0', '0'} end
w = take(KEYS[4], tonumber(ARGV[6]), tonumber(ARGV[7]), now)
if w > 0 then return {'ok', '0', num(w), '0', '0'} end
w = take(KEYS[5], tonumber(ARGV[8]), tonumber(ARGV[9]), now)
return {'ok', '0', '0', num(w), '0'}
"""
)

#: One auth failure of an address and the block it triggers: on exactly the first stage's
#: count (``max``), twice that (``second`` seconds), and from ``permanent`` on.
#: KEYS: failures, blocks. ARGV: now, ip, window s, enabled (0/1), max, first-stage s,
#: second-stage s, permanent count, exempt (0/1), channel, origin.
#: Returns {count, reason, until, since} ('' when no block was made).
AUTH_FAILURE = (
    _COMMON
    + r"""
local now = tonumber(ARGV[1])
local v = redis.call('HMGET', KEYS[1], 'n', 't')
local count, last = tonumber(v[1]) or 0, tonumber(v[2]) or now
if now - last > tonumber(ARGV[3]) then count = 0 end
count = count + 1
redis.call('HSET', KEYS[1], 'n', count, 't', num(now))
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3])))
if ARGV[4] ~= '1' or ARGV[9] == '1' then return {tostring(count), '', '', ''} end
local max, permanent = tonumber(ARGV[5]), tonumber(ARGV[8])
local untl = nil
if count >= permanent then
  untl = ''
elseif count == 2 * max then
  untl = num(now + tonumber(ARGV[7]))
elseif count == max then
  untl = num(now + tonumber(ARGV[6]))
end
if untl == nil then return {tostring(count), '', '', ''} end
local b = put_block(KEYS[2], ARGV[10], ARGV[11], ARGV[2], 'auth_failures', untl, now)
return {tostring(count), b[1], b[2], b[3]}
"""
)

#: Intrusion points for an address; from ``threshold`` a block of ``short`` seconds, from
#: twice that one of ``long`` seconds.
#: KEYS: score, blocks. ARGV: now, ip, points, window s, threshold, short s, long s,
#: exempt (0/1), channel, origin. Returns {total, reason, until, since}.
SCORE = (
    _COMMON
    + r"""
local now = tonumber(ARGV[1])
local v = redis.call('HMGET', KEYS[1], 'n', 't')
local total, last = tonumber(v[1]) or 0, tonumber(v[2]) or now
if now - last > tonumber(ARGV[4]) then total = 0 end
total = total + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'n', total, 't', num(now))
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[4])))
local threshold = tonumber(ARGV[5])
if ARGV[8] == '1' or total < threshold then return {tostring(total), '', '', ''} end
local seconds = tonumber(ARGV[6])
if total >= 2 * threshold then seconds = tonumber(ARGV[7]) end
local b = put_block(KEYS[2], ARGV[9], ARGV[10], ARGV[2], 'intrusion', num(now + seconds), now)
return {tostring(total), b[1], b[2], b[3]}
"""
)

#: Block an address (an anomaly, the owner's own block, a block found in a process's
#: database): never shortens one in force. KEYS: blocks. ARGV: now, ip, reason, until ('' =
#: permanent), channel, origin. Returns {reason, until, since, changed (0/1)}.
BLOCK = (
    _COMMON
    + r"""
local b, changed = put_block(KEYS[1], ARGV[5], ARGV[6], ARGV[2], ARGV[3], ARGV[4],
  tonumber(ARGV[1]))
return {b[1], b[2], b[3], changed and '1' or '0'}
"""
)

#: Lift a block with its failure count and score. KEYS: blocks, failures, score.
#: ARGV: ip, channel, origin. Returns 1 when there was a block.
UNBLOCK = r"""
local had = redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('PUBLISH', ARGV[2], cjson.encode({o = ARGV[3], t = 'unblock', ip = ARGV[1]}))
return had
"""

#: Store a key's record. A revoked key's record is final: nothing replaces it (key ids are
#: never reused, and a stale copy saying it is active must not bring it back).
#: KEYS: keys, revoked. ARGV: key id, record (JSON), revoked (0/1), channel, origin.
#: Returns the record in force.
PUT_KEY = r"""
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then
  local held = redis.call('HGET', KEYS[1], ARGV[1])
  if held then return held end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if ARGV[3] == '1' then
  if redis.call('SADD', KEYS[2], ARGV[1]) == 1 then
    redis.call('PUBLISH', ARGV[4], cjson.encode({o = ARGV[5], t = 'revoke', id = ARGV[1]}))
  end
end
return ARGV[2]
"""
