# wirechat in a container: built in one stage, run as the unprivileged `node` user
# with the data on a volume. See README "Operating" for the commands.
FROM node:20-bookworm-slim AS build
WORKDIR /app
COPY package.json package-lock.json tsconfig.json tsconfig.build.json ./
COPY src ./src
COPY scripts ./scripts
# npm ci runs `prepare`, which compiles the TypeScript; then the dev tools go.
RUN npm ci && npm prune --omit=dev

FROM node:20-bookworm-slim
ENV NODE_ENV=production \
    WIRECHAT_DATA_DIR=/data \
    WIRECHAT_ADMIN_HOST=0.0.0.0
WORKDIR /app
COPY --from=build --chown=node:node /app/package.json ./
COPY --from=build --chown=node:node /app/node_modules ./node_modules
COPY --from=build --chown=node:node /app/dist/src ./dist/src
RUN mkdir -p /data && chown node:node /data
USER node
VOLUME ["/data"]
# 7788 the protocol, 9090 the admin port (publish it on 127.0.0.1 only, or set WIRECHAT_ADMIN_TOKEN).
EXPOSE 7788 9090
# The health check finds the admin port in WIRECHAT_ADMIN_PORT only (set it there to move the port).
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
  CMD node -e "fetch('http://127.0.0.1:' + (process.env.WIRECHAT_ADMIN_PORT || 9090) + '/healthz').then(r => process.exit(r.ok ? 0 : 1), () => process.exit(1))"
# SIGTERM (docker stop) drains and closes the database; give it --shutdown-timeout plus the linger time.
STOPSIGNAL SIGTERM
ENTRYPOINT ["node", "dist/src/main.js"]
CMD ["serve"]
