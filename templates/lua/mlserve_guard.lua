-- mlserve's guard: who may call a project's endpoints and how often, decided per request from the
-- `guard` of the project's entry in the routing table (see cli/guard.py guard_table):
--   { access = "public" | "token",
--     tokens = { <base64 sha256 of a token>: { name = "ci", expires = 0 | epoch, rate = 5, burst = 10 } },
--     rate = 50, burst = 100,          -- the whole project's limit (absent: none)
--     cors = { "https://app.example.com", ... } }  -- origins that may call from a browser ("*": any)
-- A push of the table is live for the next request on every worker: a revoked token or a new limit
-- needs no reload. Tokens are compared by hash; the table never holds a token.

local ffi = require "ffi"
local cjson = require "cjson.safe"

ffi.cdef [[
unsigned char *SHA256(const unsigned char *d, size_t n, unsigned char *md);
]]

local shared = ngx.shared.mlserve
local digest_buffer = ffi.new("unsigned char[32]")
local G = {}

local ALLOWED_METHODS = "GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS"
local DEFAULT_HEADERS = "Authorization, Content-Type"
local PREFLIGHT_MAX_AGE = "600"

-- A worker's recent tokens and their hashes: a keep-alive client sends the same one every request.
-- Only the hash is looked up in the table, so a revoked token is refused all the same.
local digests, cached = {}, 0
local DIGEST_CACHE = 1024

local function sha256_base64(text)
    local known = digests[text]
    if known then
        return known
    end
    ffi.C.SHA256(text, #text, digest_buffer)
    local digest = ngx.encode_base64(ffi.string(digest_buffer, 32))
    if cached >= DIGEST_CACHE then
        digests, cached = {}, 0
    end
    digests[text], cached = digest, cached + 1
    return digest
end

local function refuse(status, body, headers)
    ngx.status = status
    ngx.header["Content-Type"] = "application/json"
    for name, value in pairs(headers or {}) do
        ngx.header[name] = value
    end
    ngx.say((cjson.encode(body):gsub("\\/", "/")))
    return ngx.exit(status)
end

-- Generic cell rate algorithm on one shared counter, the "theoretical arrival time": each request
-- moves it one interval on (an atomic incr, so workers never admit more than the limit together); a
-- request that would move it more than `burst` intervals past now is refused, and undone. Returns
-- nil when the request may pass, else the seconds until one would.
local function over_limit(key, rate, burst)
    rate, burst = tonumber(rate), tonumber(burst) or 1
    if not rate or rate <= 0 then
        return nil
    end
    local now, interval = ngx.now(), 1 / rate
    local tat, err = shared:incr(key, interval, now)
    if not tat then
        ngx.log(ngx.ERR, "mlserve: rate limit counter: ", err)
        return nil -- a full shared dict must not take the endpoint down
    end
    if tat < now + interval then -- idle since: the counter restarts from now (an incr, so that requests
        -- other workers counted at the same moment are kept)
        tat = shared:incr(key, now + interval - tat) or tat
    end
    local early = tat - now - burst * interval
    if early > 1e-9 then
        shared:incr(key, -interval)
        return early
    end
    return nil
end

local function too_many(scope, wait)
    return refuse(429, { error = "rate limit exceeded", limit = scope },
                  { ["Retry-After"] = tostring(math.max(1, math.ceil(wait))) })
end

local function cors_origin(origins, origin)
    if type(origins) ~= "table" or not origin then
        return nil
    end
    local lowered = origin:lower()
    for _, allowed in ipairs(origins) do
        if allowed == "*" then
            return "*"
        end
        if allowed == lowered then
            return origin
        end
    end
    return nil
end

-- Only header names go back in a preflight's answer, whatever the browser asked for.
local function requested_headers()
    local asked = ngx.var.http_access_control_request_headers
    if not asked or asked == "" then
        return DEFAULT_HEADERS
    end
    local names = {}
    for name in asked:gmatch("[^,%s]+") do
        if name:match("^[%w%-]+$") and #names < 32 then
            names[#names + 1] = name
        end
    end
    return #names > 0 and table.concat(names, ", ") or DEFAULT_HEADERS
end

-- Access phase, once the request's project is known: answers a CORS preflight itself, then refuses a
-- request without a valid token (401) or over a limit (429). Sets the CORS headers every answer of an
-- allowed origin carries (nginx adds them from $mlserve_cors_origin, to the app's answers too).
function G.check(key, guard)
    if type(guard) ~= "table" then
        guard = { access = "token", tokens = {} } -- an entry without a guard is closed, not open
    end
    local origin = ngx.var.http_origin
    local allowed = cors_origin(guard.cors, origin)
    if guard.cors then
        ngx.var.mlserve_vary = "Origin"
    end
    if allowed then
        ngx.var.mlserve_cors_origin = allowed
    end
    -- Without cors: in mlserve.yml, a preflight is the app's to answer (it may do CORS itself).
    if guard.cors and ngx.req.get_method() == "OPTIONS" and origin and ngx.var.http_access_control_request_method then
        if not allowed then
            return refuse(403, { error = "origin not allowed", project = key,
                                 detail = "list it under cors: origins: in the project's mlserve.yml" })
        end
        ngx.header["Access-Control-Allow-Methods"] = ALLOWED_METHODS
        ngx.header["Access-Control-Allow-Headers"] = requested_headers()
        ngx.header["Access-Control-Max-Age"] = PREFLIGHT_MAX_AGE
        return ngx.exit(204)
    end
    local token
    if guard.access ~= "public" then
        local auth = ngx.var.http_authorization
        local presented = auth and auth:match("^[Bb][Ee][Aa][Rr][Ee][Rr] +([%w%-%._~%+/]+=*) *$")
        local challenge = 'Bearer realm="mlserve"'
        if not presented then
            return refuse(401, { error = "missing token", project = key,
                                 detail = "send Authorization: Bearer <token> (`mlserve token create`)" },
                          { ["WWW-Authenticate"] = challenge })
        end
        token = type(guard.tokens) == "table" and guard.tokens[sha256_base64(presented)]
        local expires = token and tonumber(token.expires) or 0
        if not token or (expires > 0 and ngx.now() >= expires) then
            return refuse(401, { error = "invalid token", project = key,
                                 detail = "the token is unknown, revoked or expired" },
                          { ["WWW-Authenticate"] = challenge .. ', error="invalid_token"' })
        end
    end
    -- A token over its own limit is refused before it takes anything of the project's.
    local token_key = token and token.rate and ("rate:" .. key .. ":" .. tostring(token.name))
    if token_key then
        local wait = over_limit(token_key, token.rate, token.burst)
        if wait then
            return too_many("token", wait)
        end
    end
    if guard.rate then
        local wait = over_limit("rate:" .. key, guard.rate, guard.burst)
        if wait then
            if token_key then
                shared:incr(token_key, -1 / tonumber(token.rate)) -- it was not served: not the token's either
            end
            return too_many("project", wait)
        end
    end
    if token then
        -- The app never sees a caller's token (it may log it); it learns which token called.
        ngx.var.mlserve_authorization = ""
        ngx.var.mlserve_token_name = tostring(token.name)
    end
end

return G
