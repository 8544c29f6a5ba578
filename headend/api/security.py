"""Bearer-token authentication and role checks, as FastAPI dependencies."""

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from headend.api.auth import Principal, TokenStore

_bearer = HTTPBearer(auto_error=False)


def authenticated(tokens: TokenStore) -> Callable[..., Principal]:
    def principal(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Principal:
        if creds is None:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing bearer token",
                                headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
        found = tokens.authenticate(creds.credentials)
        if found is None:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "unknown token", headers={"WWW-Authenticate": "Bearer"})
        return found

    return principal


def require_roles(tokens: TokenStore, *allowed: str) -> Callable[..., Principal]:
    """A FastAPI dependency: the caller, if authenticated with one of `allowed`; else 401/403."""
    principal = authenticated(tokens)

    def check(who: Annotated[Principal, Depends(principal)]) -> Principal:
        if not who.roles & set(allowed):
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"needs one of the roles {', '.join(allowed)}")
        return who

    return check
