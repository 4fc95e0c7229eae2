// A real OpenID provider for the sign-in tests: npm's oidc-provider on a
// loopback port, issuing JWT access tokens for the gateway's audience.
//
//   node oidc_provider.mjs PORT KEYS_FILE [REDIRECT_URI]
//
// KEYS_FILE: the signing keys (a private JWKS), written by the test, so that a
// restart with another file rotates them. Clients: "svc" and "svc-acme"
// (client credentials; svc-acme's tokens carry team "acme"), and "page", a
// public client for the chat page's authorization code flow with PKCE.
// Prints {"issuer": ...} once it listens.
import { readFileSync } from "node:fs";
import Provider from "oidc-provider";

const [port, keysFile, redirectUri] = process.argv.slice(2);
const issuer = `http://127.0.0.1:${port}`;
const resource = "urn:chatiq-gateway";
const teams = { "svc-acme": "acme" };

const provider = new Provider(issuer, {
  jwks: JSON.parse(readFileSync(keysFile, "utf8")),
  clients: [
    { client_id: "svc", client_secret: "svc-secret", grant_types: ["client_credentials"],
      redirect_uris: [], response_types: [] },
    { client_id: "svc-acme", client_secret: "svc-acme-secret",
      grant_types: ["client_credentials"], redirect_uris: [], response_types: [] },
    { client_id: "page", token_endpoint_auth_method: "none", application_type: "web",
      grant_types: ["authorization_code"], response_types: ["code"],
      redirect_uris: redirectUri ? [redirectUri] : ["http://127.0.0.1/"] },
  ],
  cookies: { keys: ["chatiq-gateway-tests"] },
  // A browser client's token requests come from its pages' origin (Keycloak's
  // "web origins", Okta's trusted origins): the origins of its redirect URIs.
  clientBasedCORS: (ctx, origin, client) =>
    (client.redirectUris ?? []).some((uri) => new URL(uri).origin === origin),
  pkce: { required: () => true },
  features: {
    devInteractions: { enabled: true },  // its own login form: any name signs in
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => resource,
      useGrantedResource: () => true,
      getResourceServerInfo: () => ({
        scope: "chat",
        audience: "chatiq-gateway",
        accessTokenFormat: "jwt",
        accessTokenTTL: 600,
        jwt: { sign: { alg: "RS256" } },
      }),
    },
  },
  extraTokenClaims: (ctx, token) => {
    const team = teams[token.clientId];
    return team ? { team } : undefined;
  },
  findAccount: (ctx, id) => ({ accountId: id, claims: () => ({ sub: id }) }),
});
provider.proxy = false;
if (process.env.OIDC_DEBUG) provider.on("server_error", (ctx, err) => console.error(err));

provider.listen(Number(port), "127.0.0.1", () => {
  console.log(JSON.stringify({ issuer }));
});
process.on("SIGTERM", () => process.exit(0));
