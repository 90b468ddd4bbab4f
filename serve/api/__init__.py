"""The HTTP surface: request models, body reading, errors, native and OpenAI routes, the
OpenAPI schema derived from the route table."""
