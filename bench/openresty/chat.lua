-- The classic OpenResty WebSocket chat room (lua-resty-websocket +
-- lua-resty-redis), as it is usually written and copied: the baseline this
-- project replaces, run by bench/compare.sh as the target "openresty".
--
-- One request handler per WebSocket connection:
--   * a light thread opens its own Redis connection, SUBSCRIBEs to one global
--     channel and forwards every message it reads to this client;
--   * the main loop reads frames; for each text frame it opens a fresh Redis
--     connection and PUBLISHes the text to that channel; it answers pings,
--     pings the client when it has been silent for the read timeout, and
--     ends on a close frame.
-- There are no rooms (every client gets every message) and nothing is added
-- to the text: clients receive exactly what was published, as with nchan.
--
-- Where this departs from the recipe, and why (each is marked "departure"):
--   1. Module names: Debian ships lua-resty-websocket and lua-resty-redis as
--      nginx.websocket.server and nginx.redis (packages lua-nginx-websocket,
--      lua-nginx-redis), not resty.websocket.server and resty.redis.
--   2. Redis address: read from nginx variables set by the generated config
--      (the bench's private Redis is on a random port), not 127.0.0.1:6379.
--   3. No message counter prefixed to the text ("<n> <text>" in the recipe):
--      the load generator parses its own header at the start of the text.
--   4. The per-message Redis connection is closed right after PUBLISH
--      (red:close()). The recipe drops it and leaves it to the Lua garbage
--      collector (or the end of the request); with thousands of clients the
--      open count would then depend on GC timing. It is still one TCP
--      connection to Redis per message, as in the recipe: no set_keepalive,
--      which would turn it into a connection pool, an optimisation the
--      recipe does not have.
--   5. When the main loop ends, the subscriber thread is killed
--      (ngx.thread.kill). The recipe waits for it (ngx.thread.wait), and it
--      only returns when a later message fails to send: with no traffic the
--      handler, its subscription and both sockets would stay after the client
--      left, and leak into the next benchmark scenario.
--   6. A read error on the subscription other than the read timeout ends the
--      handler. The recipe's loop ignores every error, so a closed Redis
--      connection would make it spin on the CPU forever.
--   7. The "send ping" / "client ponged" lines the recipe logs at ERR level on
--      every ping are logged at INFO (below the bench's error_log level):
--      10,000 idle clients would otherwise write to the error log every
--      10 s each.

local server = require "nginx.websocket.server"   -- departure 1
local redis = require "nginx.redis"               -- departure 1

local channel_name = "chat"
local redis_host = ngx.var.chat_redis_host                -- departure 2
local redis_port = tonumber(ngx.var.chat_redis_port)      -- departure 2

local wb, err = server:new{
    timeout = 10000,          -- ms: a silent client is pinged after this
    max_payload_len = 65535,
}
if not wb then
    ngx.log(ngx.ERR, "failed to new websocket: ", err)
    return ngx.exit(444)
end

-- Redis -> this client.
local push = function()
    local red = redis:new()
    red:set_timeout(5000)
    local ok, err = red:connect(redis_host, redis_port)
    if not ok then
        ngx.log(ngx.ERR, "failed to connect redis: ", err)
        wb:send_close()
        return
    end

    local res, err = red:subscribe(channel_name)
    if not res then
        ngx.log(ngx.ERR, "failed to sub redis: ", err)
        wb:send_close()
        return
    end

    while true do
        local res, err = red:read_reply()
        if res then
            -- res = { "message", channel, text }
            local item = res[3]
            local bytes, err = wb:send_text(item)   -- departure 3: no counter
            if not bytes then
                ngx.log(ngx.ERR, "failed to send text: ", err)
                return ngx.exit(444)
            end
        elseif err ~= "timeout" then                  -- departure 6
            ngx.log(ngx.ERR, "failed to read reply: ", err)
            return ngx.exit(444)
        end
    end
end

local co = ngx.thread.spawn(push)

-- This client -> Redis.
while true do
    local data, typ, err = wb:recv_frame()

    if wb.fatal then
        ngx.log(ngx.ERR, "failed to receive frame: ", err)
        return ngx.exit(444)
    end

    if not data then
        -- read timeout: the client has been silent, ping it
        local bytes, err = wb:send_ping()
        if not bytes then
            ngx.log(ngx.ERR, "failed to send ping: ", err)
            return ngx.exit(444)
        end
        ngx.log(ngx.INFO, "send ping")                -- departure 7
    elseif typ == "close" then
        break
    elseif typ == "ping" then
        local bytes, err = wb:send_pong()
        if not bytes then
            ngx.log(ngx.ERR, "failed to send pong: ", err)
            return ngx.exit(444)
        end
    elseif typ == "pong" then
        ngx.log(ngx.INFO, "client ponged")            -- departure 7
    elseif typ == "text" then
        -- a fresh Redis connection for every message
        local red2 = redis:new()
        red2:set_timeout(1000)
        local ok, err = red2:connect(redis_host, redis_port)
        if not ok then
            ngx.log(ngx.ERR, "failed to connect redis: ", err)
            break
        end
        local res, err = red2:publish(channel_name, data)
        if not res then
            ngx.log(ngx.ERR, "failed to publish redis: ", err)
        end
        red2:close()                                  -- departure 4
    end
end

wb:send_close()
ngx.thread.kill(co)                                   -- departure 5
