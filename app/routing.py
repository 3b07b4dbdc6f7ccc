"""Engine clients the ingress uses: one per serving mode.

`CollocatedClient` streams a request from one `Collocated` replica (Serve picks it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from ray.serve.handle import DeploymentHandle

from app.messages import GenerateRequest, GenerationChunk


class CollocatedClient:
    def __init__(self, handle: DeploymentHandle):
        self.handle = handle.options(stream=True)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerationChunk]:
        async for chunk in self.handle.generate.remote(request):
            yield chunk
