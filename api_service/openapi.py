"""The OpenAPI 3.1 document, generated from the pydantic models that validate the API."""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from api_service.models import (
    Health,
    Problem,
    ResendAccepted,
    ResendRequest,
    SignupRequest,
    User,
    VerifyEmailQuery,
    VerifyEmailResult,
)

REF = "#/components/schemas/{model}"


def _problem(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/problem+json": {"schema": {"$ref": REF.format(model="Problem")}}},
    }


def build_openapi() -> dict[str, Any]:
    _, defs = models_json_schema(
        [
            (SignupRequest, "validation"),
            (ResendRequest, "validation"),
            (ResendAccepted, "serialization"),
            (User, "serialization"),
            (VerifyEmailResult, "serialization"),
            (Problem, "serialization"),
            (Health, "serialization"),
        ],
        ref_template=REF,
    )
    query_schema = VerifyEmailQuery.model_json_schema()
    params = [
        {"name": name, "in": "query", "required": True, "schema": schema}
        for name, schema in query_schema["properties"].items()
    ]

    def ref(model: str) -> dict[str, Any]:
        return {"$ref": REF.format(model=model)}

    def json_body(model: str, description: str) -> dict[str, Any]:
        return {"description": description, "content": {"application/json": {"schema": ref(model)}}}

    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Signup API",
            "version": "1.0.0",
            "description": "Sign up, then verify the email address with the emailed link.",
        },
        "paths": {
            "/v1/users": {
                "post": {
                    "operationId": "createUser",
                    "summary": "Create a user and send a verification email",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": ref("SignupRequest")}},
                    },
                    "responses": {
                        "201": json_body("User", "The user was created."),
                        "400": _problem("The body is not valid JSON, or does not decode."),
                        "409": _problem("The username or the email is taken."),
                        "413": _problem("The body is larger than 64 KiB."),
                        "415": _problem("The body is not application/json."),
                        "422": _problem("A field is invalid; invalid-params says which and why."),
                        "500": _problem("Unexpected error."),
                        "503": _problem(
                            "Too many signups are waiting for a password hash; try again"
                            " after Retry-After seconds."
                        ),
                    },
                }
            },
            "/v1/verify_email": {
                "get": {
                    "operationId": "verifyEmail",
                    "summary": "Verify an email address with the link from the email",
                    "parameters": params,
                    "responses": {
                        "200": {
                            "description": "The address is verified.",
                            "content": {
                                "application/json": {"schema": ref("VerifyEmailResult")},
                                "text/html": {"schema": {"type": "string"}},
                            },
                        },
                        "400": _problem("The link is not valid."),
                        "409": _problem("The link was used already."),
                        "410": _problem("The link has expired."),
                        "422": _problem("A query parameter is missing or malformed."),
                    },
                }
            },
            "/v1/verify_email/resend": {
                "post": {
                    "operationId": "resendVerifyEmail",
                    "summary": "Send a new verification email to an unverified address",
                    "description": (
                        "Accepted whatever the address (unknown, verified, or asked for"
                        " within the resend interval), so that the answer does not tell who"
                        " signed up; an email goes out only to an unverified account."
                    ),
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": ref("ResendRequest")}},
                    },
                    "responses": {
                        "202": json_body("ResendAccepted", "Taken; an email follows if due."),
                        "400": _problem("The body is not valid JSON, or does not decode."),
                        "413": _problem("The body is larger than 64 KiB."),
                        "415": _problem("The body is not application/json."),
                        "422": _problem("The address is invalid."),
                        "500": _problem("Unexpected error."),
                    },
                }
            },
            "/healthz": {
                "get": {
                    "operationId": "healthz",
                    "summary": "The process is alive",
                    "responses": {"200": json_body("Health", "Alive.")},
                }
            },
            "/readyz": {
                "get": {
                    "operationId": "readyz",
                    "summary": "The process can reach Postgres",
                    "responses": {
                        "200": json_body("Health", "Ready."),
                        "503": _problem("Postgres is unreachable."),
                    },
                }
            },
        },
        "components": {"schemas": defs["$defs"]},
    }
