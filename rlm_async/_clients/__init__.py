"""Chat clients: the protocol the engine speaks, the OpenAI SDK client, a lean aiohttp one, a fake for tests."""

from ._aiohttp import AiohttpClient
from ._base import ChatClient, ChatRequest, ChatResponse, Message, windows_from_models
from ._fake import FakeClient
from ._openai import OpenAIClient

__all__ = [
    "AiohttpClient",
    "ChatClient",
    "ChatRequest",
    "ChatResponse",
    "FakeClient",
    "Message",
    "OpenAIClient",
    "windows_from_models",
]
