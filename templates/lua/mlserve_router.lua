-- mlserve's routing plane: which instance takes a request, decided per request from a table that
-- mlserve pushes over the gateway's control socket. Changing who takes traffic never reloads nginx,
-- so keep-alive clients never see a closed connection because of it.
--
-- The table (JSON):
--   jobs:     { <endpoint id>: { name = "owner/projects/p/3", project = "owner/projects/p", socket = "/.../uwsgi.sock",
--                                stats = "/.../stats.sock", ready = true, version = 2 } }
--   projects: { "owner/projects/p": {
--       pools    = { { version = 2, weight = 90, ready = { <id>, ... },   -- primaries taking traffic now
--                      spare = { <id>, ... } }, ... },  -- the other pools' ready jobs, then the fallback's
--       fallback = { <id>, ... },           -- ready jobs of fallback versions
--       versions = { ["2"] = { <id>, ... } }, -- ready jobs of each version with an active job
--       latest   = 4,                       -- the newest version number
--       sticky   = false,                   -- a cookie keeps a browser on one version
--       guard    = { access = "token", ... } } }  -- who may call it, how often (mlserve_guard.lua)
-- Every worker reads the shared copy when its version changes, so a push is live on all workers
-- for their next request. The project endpoint picks a pool by smooth weighted round robin (exact
-- shares, per worker), then an instance of it by round robin.

local cjson = require "cjson.safe"
local balancer = require "ngx.balancer"
local guard = require "mlserve_guard"
local ffi = require "ffi"
local bit = require "bit"

ffi.cdef [[
struct mlserve_sockaddr_un { unsigned short sun_family; char sun_path[108]; };
int socket(int domain, int type, int protocol);
int connect(int fd, const void *addr, unsigned int len);
int close(int fd);
]]
local AF_UNIX, SOCK_STREAM, SOCK_NONBLOCK = 1, 1, 2048
local ENOENT, ECONNREFUSED = 2, 111

local shared = ngx.shared.mlserve
local M = {}

local cached_version = nil
local routes = { jobs = {}, projects = {} }
local turns = {} -- round-robin position per pool, per worker
local credits = {} -- smooth weighted round robin state per project, per worker (kept across pushes)
local STICKY_COOKIE = "mlserve_version"
local MAX_TRIES = 3 -- instances of the chosen pool tried when they cannot be reached, then as many spares

-- A peer that cannot exist: connecting to it fails at once and ends the tries with a 502.
local NO_REPLAY = "unix:/nonexistent/mlserve-never-resend-a-sent-request.sock"

-- The errno of a non-blocking connect to a unix socket, closed at once (cosockets are not available in
-- the balancer); 0 when it connected, or when there is nothing to ask or it cannot tell.
local function connect_error(path)
    if type(path) ~= "string" then
        return 0
    end
    local fd = ffi.C.socket(AF_UNIX, bit.bor(SOCK_STREAM, SOCK_NONBLOCK), 0)
    if fd < 0 then
        return 0
    end
    local addr = ffi.new("struct mlserve_sockaddr_un")
    addr.sun_family = AF_UNIX
    ffi.copy(addr.sun_path, path)
    local rc = ffi.C.connect(fd, addr, ffi.sizeof(addr))
    local err = ffi.errno()
    ffi.C.close(fd)
    return rc == 0 and 0 or err
end

-- Whether the instance that took a request lives on: its socket takes connections (refused or gone:
-- it died), and its uWSGI master's stats socket does not refuse them (the master alone holds it and
-- dies first, while a worker may hold the listening socket a few milliseconds longer). A stats
-- socket that is not there (an instance started without one) says nothing.
local function lives(ctx)
    local err = connect_error(ctx.socket)
    return err ~= ECONNREFUSED and err ~= ENOENT and connect_error(ctx.stats) ~= ECONNREFUSED
end

local function list(value)
    return type(value) == "table" and value or {}
end

-- A project entry as route() reads it, whatever a table pushed by another mlserve version left out;
-- `split` names its pools and weights, so a push that changes neither keeps the round robin going.
local function checked(entry)
    entry = list(entry)
    entry.pools, entry.fallback, entry.versions = list(entry.pools), list(entry.fallback), list(entry.versions)
    local split = {}
    for i, pool in ipairs(entry.pools) do
        pool.ready, pool.weight = list(pool.ready), tonumber(pool.weight) or 1
        split[i] = tostring(pool.version) .. ":" .. pool.weight
    end
    entry.split = table.concat(split, ",")
    return entry
end

local function current()
    local version = shared:get("version")
    if version ~= cached_version then
        local decoded = cjson.decode(shared:get("routes") or "")
        if type(decoded) == "table" then
            decoded.jobs, decoded.projects = list(decoded.jobs), list(decoded.projects)
            for key, entry in pairs(decoded.projects) do
                decoded.projects[key] = checked(entry)
            end
            routes = decoded
        end
        cached_version = version
    end
    return routes
end

local function answer(status, body, retry_after)
    ngx.status = status
    ngx.header["Content-Type"] = "application/json"
    if retry_after then
        ngx.header["Retry-After"] = retry_after
    end
    -- lua-cjson escapes "/" as "\/"; the names here never hold a backslash, so plain slashes are safe.
    ngx.say((cjson.encode(body):gsub("\\/", "/")))
    return ngx.exit(status)
end

local function valid(table_)
    return type(table_) == "table" and type(table_.jobs) == "table" and type(table_.projects) == "table"
end

-- The control socket: PUT a new table, GET the current one.
function M.control()
    if ngx.req.get_method() == "GET" then
        ngx.header["Content-Type"] = "application/json"
        ngx.say(shared:get("routes") or '{"jobs": {}, "projects": {}}')
        return
    end
    ngx.req.read_body()
    local body = ngx.req.get_body_data()
    if not body or not valid(cjson.decode(body)) then
        return answer(400, { error = "a routing table is a JSON object with jobs and projects" })
    end
    local ok, err = shared:set("routes", body)
    if not ok then
        return answer(500, { error = "the routing table does not fit: " .. tostring(err) })
    end
    local version = shared:incr("version", 1, 0)
    ngx.say(cjson.encode({ version = version }))
end

-- The pool of a project endpoint's request: nginx's smooth weighted round robin over the pools.
local function pick(key, entry)
    local pools = entry.pools
    if #pools == 1 then
        return pools[1]
    end
    local credit = credits[key]
    if not credit or credit.split ~= entry.split then
        credit = { split = entry.split }
        for i = 1, #pools do
            credit[i] = 0
        end
        credits[key] = credit
    end
    local total, best = 0, 1
    for i, pool in ipairs(pools) do
        credit[i] = credit[i] + pool.weight
        total = total + pool.weight
        if credit[i] > credit[best] then
            best = i
        end
    end
    credit[best] = credit[best] - total
    return pools[best]
end

-- A sticky project keeps a browser on the version its cookie names while that version takes traffic.
local function sticky_pool(key, entry)
    local wanted = ngx.var.cookie_mlserve_version
    if wanted then
        for _, pool in ipairs(entry.pools) do
            if tostring(pool.version) == wanted then
                return pool
            end
        end
    end
    local pool = pick(key, entry)
    ngx.var.mlserve_cookie = STICKY_COOKIE .. "=" .. pool.version .. "; Path=/serve/" .. key .. "; HttpOnly; SameSite=Lax"
    return pool
end

-- Access phase: find the endpoint (whole path segments only), set SCRIPT_NAME and PATH_INFO, and
-- choose the pool of instances the balancer picks from; unknown and unavailable endpoints get JSON.
function M.route()
    local t = current()
    local uri = ngx.var.uri
    local owner, project, rest = uri:match("^/serve/([a-z0-9][a-z0-9_%-]*)/projects/([a-z0-9][a-z0-9_%-]*)(.*)$")
    local prefix, pool, key, spare
    if owner and (rest == "" or rest:sub(1, 1) == "/") then
        key = owner .. "/projects/" .. project
        local entry = t.projects[key]
        if not entry then
            return answer(404, { error = "no such endpoint" })
        end
        guard.check(key, entry.guard)
        local number, after = rest:match("^/v/([1-9][0-9]*)(.*)$")
        if number and (after == "" or after:sub(1, 1) == "/") then
            -- A version's own endpoint: its healthy jobs, whatever its share.
            pool = entry.versions[number]
            if not pool then
                if tonumber(number) > (entry.latest or 0) then
                    return answer(404, { error = "no such version", project = key })
                end
                return answer(503, { error = "version has no serving job", project = key, version = tonumber(number),
                                     detail = "start one with `mlserve scale 1 --version " .. number .. " --project "
                                              .. project .. "`" }, "5")
            end
            if #pool == 0 then
                return answer(503, { error = "version has no healthy job", project = key,
                                     version = tonumber(number) }, "5")
            end
            prefix, key, rest = "/serve/" .. key .. "/v/" .. number, key .. "/v/" .. number, after
        elseif #entry.pools > 0 then
            local chosen = entry.sticky and sticky_pool(key, entry) or pick(key, entry)
            prefix, pool, spare = "/serve/" .. key, chosen.ready, chosen.spare
            key = key .. "/v/" .. chosen.version
        elseif #entry.fallback > 0 then
            prefix, pool = "/serve/" .. key, entry.fallback
            key = key .. "/fallback"
        else
            return answer(503, { error = "no healthy serving job", project = key }, "5")
        end
    else
        local id
        id, rest = uri:match("^/serve/([A-Za-z0-9]+)(.*)$")
        local job = id and (rest == "" or rest:sub(1, 1) == "/") and t.jobs[id]
        if not job then
            return answer(404, { error = "no such endpoint" })
        end
        guard.check(job.project, (t.projects[job.project] or {}).guard)
        if not job.ready then
            return answer(503, { error = "job not available", job = job.name,
                                 detail = "see `mlserve info " .. job.name .. "`" }, "5")
        end
        prefix, pool, key = "/serve/" .. id, { id }, id
    end
    ngx.var.mlserve_script_name = prefix
    ngx.var.mlserve_path_info = (rest ~= "" and rest) or "/"
    local ctx = ngx.ctx
    ctx.routes, ctx.pool, ctx.key, ctx.spare = t, pool, key, spare
end

-- Balancer phase: round robin over the pool. A try that failed before it connected moves on to the
-- next instance, and past the pool's to the spare ones (other versions', then the fallback's).
-- A request that reached an instance is sent again only when that whole instance died with it
-- (killed, restarted: see lives()), and only if nginx retries it at all (idempotent methods). If the
-- instance lives on, the request itself broke its worker (out of memory, a crash): it is never sent
-- to another one, so one bad request cannot take them all down.
function M.balance()
    local ctx = ngx.ctx
    local pool, spare = ctx.pool, ctx.spare
    if balancer.get_last_failure() then
        -- $upstream_connect_time has one entry per try, the current (empty) one last.
        local last = (ngx.var.upstream_connect_time or ""):match("([^,:%s]+)[,:%s]*$")
        if ctx.stop or (last ~= "-" and lives(ctx)) then
            ctx.stop = true
            return balancer.set_current_peer(NO_REPLAY)
        end
    else
        ctx.own = math.min(#pool, MAX_TRIES)
        local more = ctx.own - 1 + (spare and math.min(#spare, MAX_TRIES) or 0)
        if more > 0 then
            balancer.set_more_tries(more)
        end
        local turn = (turns[ctx.key] or 0) + 1
        turns[ctx.key] = turn
        ctx.turn, ctx.tries = turn, 0
    end
    local id
    if ctx.tries < ctx.own then
        id = pool[(ctx.turn + ctx.tries) % #pool + 1]
    else
        id = spare[ctx.tries - ctx.own + 1] -- in order: other versions first, the fallback last
    end
    ctx.tries = ctx.tries + 1
    local job = ctx.routes.jobs[id]
    ctx.socket, ctx.stats = job.socket, job.stats
    ngx.var.mlserve_version = job.version
    local ok, err = balancer.set_current_peer("unix:" .. ctx.socket)
    if not ok then
        ngx.log(ngx.ERR, "mlserve: cannot route to ", id, ": ", err)
        return ngx.exit(500)
    end
end

return M
