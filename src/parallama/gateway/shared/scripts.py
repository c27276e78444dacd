"""The Lua scripts that keep the gateways' shared state in Redis, each one atomic.

Times are Redis's own (`TIME`), so that the gateways' clocks need not agree; a lease or a
heartbeat is a member of a sorted set scored by when it expires.
"""

# KEYS: the candidates' slot sets, then the gateways' set, the model's heads (a hash: gateway ->
# "expires\toffer\tcandidates"), its fair turns (a hash: client -> turn) and its current turn.
# ARGV: ttl (ms), a prefix for the leases' ids, the gateway's id, how long its head stands (ms),
# its offer: the FIFO orders of its next requests ("o1,o2,..."), or (fair) "f:" and its next
# clients ("client\30weight", split by \31); how many leases it wants, then each candidate's
# slots. Grants leases while there are more free slots than other gateways' offered requests
# that come first (and could use them); what it offered and did not get is its head. Returns
# how many gateways are alive (so that each knows its share should Redis go away), then for
# each lease granted the 1-based index of its candidate and (fair) the client whose turn it was.
ACQUIRE = r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local n = #KEYS - 4
local gateways, heads, turns, current = KEYS[n + 1], KEYS[n + 2], KEYS[n + 3], KEYS[n + 4]
local gateway, offer, wanted = ARGV[3], ARGV[5], tonumber(ARGV[6])
local alive = redis.call('ZCOUNT', gateways, now, '+inf')
local left = {}
for i = 1, n do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  left[i] = tonumber(ARGV[6 + i]) - redis.call('ZCARD', KEYS[i])
end
local turn_now = tonumber(redis.call('GET', current) or '0')
local function turn_of(client)
  return math.max(tonumber(redis.call('HGET', turns, client) or '0'), turn_now)
end
-- An offer's parts: FIFO orders (strings), or fair {client, weight} pairs.
local function parts(text)
  local found = {}
  if string.sub(text, 1, 2) == 'f:' then
    for entry in string.gmatch(string.sub(text, 3), '[^\031]+') do
      local client, weight = string.match(entry, '^(.*)\030(.*)$')
      found[#found + 1] = {client, tonumber(weight)}
    end
  else
    for order in string.gmatch(text, '[^,]+') do found[#found + 1] = order end
  end
  return found
end
-- Fair: whose turn comes first of an offer's clients, when, and that client's weight.
local function first_of(found)
  local best, who, weight = math.huge, nil, 1
  for _, pair in ipairs(found) do
    local turn = turn_of(pair[1])
    if turn < best then best, who, weight = turn, pair[1], pair[2] end
  end
  return best, who, weight
end
-- How many of another gateway's requests come before `order` (ties go to the lower id).
local function before(found, order, other)
  local count = 0
  for _, part in ipairs(found) do
    local theirs = type(part) == 'table' and turn_of(part[1]) or tonumber(part)
    if theirs < order or (theirs == order and other < gateway) then count = count + 1 end
  end
  return count
end
local others = {}
local all = redis.call('HGETALL', heads)
for j = 1, #all, 2 do
  if all[j] ~= gateway then
    local expires, their, wants = string.match(all[j + 1], '^(%d+)\t([^\t]*)\t(.*)$')
    if expires == nil or tonumber(expires) < now then
      redis.call('HDEL', heads, all[j])
    else
      others[#others + 1] = {all[j], parts(their), '\n' .. wants .. '\n'}
    end
  end
end
local mine, fair = parts(offer), string.sub(offer, 1, 2) == 'f:'
local granted = {alive}
local count = 0
while count < wanted do
  local free, first = 0, 0
  for i = 1, n do
    if left[i] > 0 then
      free = free + left[i]
      if first == 0 then first = i end
    end
  end
  if free == 0 then break end
  local order, who, weight
  if fair then
    order, who, weight = first_of(mine)
  else
    order = tonumber(mine[count + 1])
  end
  if order == nil or order == math.huge then break end
  -- Other gateways' requests that come first and could take one of the free slots.
  local ahead = 0
  for _, other in ipairs(others) do
    for i = 1, n do
      if left[i] > 0 and string.find(other[3], '\n' .. KEYS[i] .. '\n', 1, true) then
        ahead = ahead + before(other[2], order, other[1])
        break
      end
    end
  end
  if ahead >= free then break end
  count = count + 1
  left[first] = left[first] - 1
  redis.call('ZADD', KEYS[first], now + ttl, ARGV[2] .. '.' .. count)
  redis.call('PEXPIRE', KEYS[first], ttl * 4)
  if fair then
    -- Stride scheduling over every gateway's clients: this one's next turn falls 1/weight on.
    turn_now = order
    redis.call('SET', current, tostring(order), 'PX', 3600000)
    redis.call('HSET', turns, who, tostring(order + 1 / weight))
    redis.call('PEXPIRE', turns, 3600000)
  end
  granted[#granted + 1] = first
  granted[#granted + 1] = who or ''
end
if count < wanted then  -- still waiting: where its next request stands, for the others to see
  local head = fair and offer or table.concat(mine, ',', count + 1)
  if head ~= '' then
    local candidates = table.concat(KEYS, '\n', 1, n)
    local expires = now + tonumber(ARGV[4])
    redis.call('HSET', heads, gateway, expires .. '\t' .. head .. '\t' .. candidates)
    redis.call('PEXPIRE', heads, ttl * 4)
  end
else
  redis.call('HDEL', heads, gateway)
end
if fair and count > 0 and redis.call('HLEN', turns) > 4096 then  -- forget turns that have come
  local all_turns = redis.call('HGETALL', turns)
  for j = 1, #all_turns, 2 do
    if tonumber(all_turns[j + 1]) <= turn_now then redis.call('HDEL', turns, all_turns[j]) end
  end
end
return granted
"""
# KEYS: a slot set per lease given back, then the heads of the models they were for. ARGV: how
# many leases, the lease ids, the channel, this gateway's id, then the models. A model whose
# slots another gateway waits for gets a message on the channel.
GIVE_BACK = """
local n = tonumber(ARGV[1])
for i = 1, n do redis.call('ZREM', KEYS[i], ARGV[1 + i]) end
local channel, gateway = ARGV[n + 2], ARGV[n + 3]
for j = n + 1, #KEYS do
  if redis.call('HLEN', KEYS[j]) > redis.call('HEXISTS', KEYS[j], gateway) then
    redis.call('PUBLISH', channel, ARGV[n + 3 + j - n])
  end
end
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
