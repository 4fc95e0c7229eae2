// Single sign-on for the chat page: OpenID Connect's authorization code flow
// with PKCE, run in the browser as a public client (no secret). The state and
// the nonce are checked on the way back; the access token is kept in
// sessionStorage (this tab, until it closes), never in localStorage.
"use strict";

const PENDING = "chatiq.sign-in";  // the flow under way: its state, nonce and verifier
const TOKEN = "chatiq.token";  // {access_token, expires_at}
const EARLY_MS = 30_000;  // a token this close to its end is taken as ended

// What the gateway says of its sign-in ([page] oidc_*), or null: keys only.
export async function signInSettings() {
  const response = await fetch("/api/sign-in").catch(() => null);
  return response?.ok ? response.json() : null;
}

export function currentToken() {
  try {
    const token = JSON.parse(sessionStorage.getItem(TOKEN));
    return token && token.expires_at - EARLY_MS > Date.now() ? token.access_token : null;
  } catch {
    return null;
  }
}

export function signOut() {
  sessionStorage.removeItem(TOKEN);
}

// Off to the identity provider; the page comes back with ?code=...&state=...
export async function signIn(settings) {
  const metadata = await discover(settings.issuer);
  const pending = { state: random(), nonce: random(), verifier: random() };
  sessionStorage.setItem(PENDING, JSON.stringify(pending));
  const url = new URL(metadata.authorization_endpoint);
  url.search = new URLSearchParams({
    response_type: "code",
    client_id: settings.client_id,
    redirect_uri: redirectUri(),
    scope: settings.scope,
    state: pending.state,
    nonce: pending.nonce,
    code_challenge: await challenge(pending.verifier),
    code_challenge_method: "S256",
  });
  location.assign(url);
}

// Back from the identity provider: the code for a token. Null when this page
// load is not a return from it; an Error (for the person) when it failed.
export async function finishSignIn(settings) {
  const answer = new URLSearchParams(location.search);
  if (!answer.has("code") && !answer.has("error")) return null;
  const pending = JSON.parse(sessionStorage.getItem(PENDING) ?? "null");
  sessionStorage.removeItem(PENDING);
  history.replaceState(null, "", location.pathname);  // the code is used once
  if (answer.has("error")) {
    throw new Error(`Sign-in failed: ${answer.get("error_description") ?? answer.get("error")}`);
  }
  if (!pending || answer.get("state") !== pending.state) {
    throw new Error("Sign-in failed: the answer is not for this page's request (state).");
  }
  if (answer.has("iss") && answer.get("iss") !== settings.issuer) {
    throw new Error("Sign-in failed: the answer came from another issuer.");
  }
  const metadata = await discover(settings.issuer);
  const response = await fetch(metadata.token_endpoint, {
    method: "POST",
    headers: { "Content-Type": "application/x-www-form-urlencoded" },
    body: new URLSearchParams({
      grant_type: "authorization_code",
      code: answer.get("code"),
      redirect_uri: redirectUri(),
      client_id: settings.client_id,
      code_verifier: pending.verifier,
    }),
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok || !body.access_token) {
    throw new Error(`Sign-in failed: ${body.error_description ?? body.error ?? response.status}`);
  }
  if (body.id_token && claims(body.id_token).nonce !== pending.nonce) {
    throw new Error("Sign-in failed: the ID token is not for this page's request (nonce).");
  }
  const expiresIn = Number(body.expires_in) || 300;
  sessionStorage.setItem(TOKEN, JSON.stringify({
    access_token: body.access_token, expires_at: Date.now() + expiresIn * 1000,
  }));
  return body.access_token;
}

async function discover(issuer) {
  const response = await fetch(`${issuer.replace(/\/$/, "")}/.well-known/openid-configuration`);
  if (!response.ok) throw new Error(`The identity provider answered ${response.status}.`);
  const metadata = await response.json();
  if (metadata.issuer !== issuer) throw new Error("The identity provider names another issuer.");
  return metadata;
}

function redirectUri() {
  return `${location.origin}/`;
}

function random() {
  return base64url(crypto.getRandomValues(new Uint8Array(32)));
}

async function challenge(verifier) {
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(verifier));
  return base64url(new Uint8Array(digest));
}

function base64url(bytes) {
  return btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

// A JWT's claims, unverified: only its nonce is read (the gateway verifies tokens).
function claims(jwt) {
  const part = jwt.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
  return JSON.parse(atob(part.padEnd(part.length + ((4 - (part.length % 4)) % 4), "=")));
}
