"""segflow's HTTP API: the gateway (:mod:`segflow.api.gateway`, aiohttp, bearer-token auth,
documented in ``openapi.yaml``) over the services' internal read-only endpoints
(:mod:`segflow.runtime.internal_api`, served from each service's own process)."""
