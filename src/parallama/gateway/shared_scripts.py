"""The Lua scripts that keep the gateways' shared state in Redis, each one atomic.

Times are Redis's own (`TIME`), so that the gateways' clocks need not agree; a lease or a
heartbeat is a member of a sorted set scored by when it expires.
"""

# KEYS: the candidates' slot sets, then the gateways' set, the model's heads (a hash: gateway ->
# "expires\torder\tcandidates"), its fair turns (a hash: client -> turn) and its current turn.
# ARGV: ttl (ms), lease id, gateway id, how long a head stands (ms), the gateway's order: its
# next request's FIFO order, or (fair) "f:" and its next clients ("client\30weight", split by
# \31), then each candidate's slots. Returns the 1-based index of the candidate that gave a slot
# (0: none had room, or other gateways' requests come first), how many gateways are alive (so
# that each knows its share should Redis go away) and, fair, the client whose turn it was.
ACQUIRE = r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local n = #KEYS - 4
local gateways, heads, turns, current = KEYS[n + 1], KEYS[n + 2], KEYS[n + 3], KEYS[n + 4]
local alive = redis.call('ZCOUNT', gateways, now, '+inf')
local room, free, first = {}, 0, 0
for i = 1, n do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  local left = tonumber(ARGV[5 + i]) - redis.call('ZCARD', KEYS[i])
  if left > 0 then
    room[#room + 1] = KEYS[i]
    free = free + left
    if first == 0 then first = i end
  end
end
local turn_now = tonumber(redis.call('GET', current) or '0')
-- An order (lower first), and for the fair one the client whose turn comes first and its weight.
local function order_of(head)
  if string.sub(head, 1, 2) ~= 'f:' then return tonumber(head) end
  local best, who, weight
  for entry in string.gmatch(string.sub(head, 3), '[^\031]+') do
    local client, w = string.match(entry, '^(.*)\030(.*)$')
    local turn = math.max(tonumber(redis.call('HGET', turns, client) or '0'), turn_now)
    if best == nil or turn < best then best, who, weight = turn, client, tonumber(w) end
  end
  return best or math.huge, who, weight
end
local gateway, head = ARGV[3], ARGV[5]
local mine, who, weight = order_of(head)
local candidates = table.concat(KEYS, '\n', 1, n)
redis.call('HSET', heads, gateway, (now + tonumber(ARGV[4])) .. '\t' .. head .. '\t' .. candidates)
redis.call('PEXPIRE', heads, ttl * 4)
if free == 0 then return {0, alive} end
-- Other gateways' next requests that come first and could take one of the free slots.
local ahead = 0
local all = redis.call('HGETALL', heads)
for j = 1, #all, 2 do
  local other = all[j]
  if other ~= gateway then
    local expires, their, wants = string.match(all[j + 1], '^(%d+)\t([^\t]*)\t(.*)$')
    if expires == nil or tonumber(expires) < now then
      redis.call('HDEL', heads, other)
    else
      local theirs = order_of(their)
      if theirs < mine or (theirs == mine and other < gateway) then
        wants = '\n' .. wants .. '\n'
        for _, key in ipairs(room) do
          if string.find(wants, '\n' .. key .. '\n', 1, true) then
            ahead = ahead + 1
            break
          end
        end
      end
    end
  end
end
if ahead >= free then return {0, alive} end
redis.call('ZADD', KEYS[first], now + ttl, ARGV[2])
redis.call('PEXPIRE', KEYS[first], ttl * 4)
redis.call('HDEL', heads, gateway)
if who == nil then return {first, alive} end
-- Stride scheduling over every gateway's clients: the next turn of this one falls 1/weight on.
redis.call('SET', current, tostring(mine), 'PX', 3600000)
redis.call('HSET', turns, who, tostring(mine + 1 / weight))
redis.call('PEXPIRE', turns, 3600000)
if redis.call('HLEN', turns) > 4096 then  -- forget clients whose turn has come
  local all_turns = redis.call('HGETALL', turns)
  for j = 1, #all_turns, 2 do
    if tonumber(all_turns[j + 1]) <= mine then redis.call('HDEL', turns, all_turns[j]) end
  end
end
return {first, alive, who}
"""
# KEYS: slot sets, one per lease, then the gateways' set and their statuses (a hash: gateway ->
# JSON). ARGV: ttl (ms), this gateway's id, its status, then the lease ids. Renews (or writes
# again, after Redis lost them) the leases, the gateway's heartbeat and status; returns how many
# gateways are alive, and their statuses (gateway, status, ...).
RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local n = #KEYS - 2
local gateways, statuses = KEYS[n + 1], KEYS[n + 2]
for i = 1, n do
  redis.call('ZADD', KEYS[i], now + ttl, ARGV[3 + i])
  redis.call('PEXPIRE', KEYS[i], ttl * 4)
end
redis.call('ZADD', gateways, now + ttl, ARGV[2])
redis.call('ZREMRANGEBYSCORE', gateways, '-inf', now)
redis.call('HSET', statuses, ARGV[2], ARGV[3])
redis.call('PEXPIRE', statuses, ttl * 4)
local all, fleet = redis.call('HGETALL', statuses), {}
for j = 1, #all, 2 do
  if redis.call('ZSCORE', gateways, all[j]) then
    fleet[#fleet + 1] = all[j]
    fleet[#fleet + 1] = all[j + 1]
  else
    redis.call('HDEL', statuses, all[j])
  end
end
return {redis.call('ZCARD', gateways), fleet}
"""
