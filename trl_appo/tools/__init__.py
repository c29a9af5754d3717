"""Tools the policy can call: the callback API, the sandboxed Python tool and search."""

from .base import Tool, ToolCall, ToolError, ToolOutput, ToolRegistry, ToolResult, ToolStats, tool
from .python import PythonTool, SandboxResult
from .search import (
    ARPOCacheBackend,
    BM25Backend,
    BM25Index,
    HTTPSearchBackend,
    SearchBackend,
    SearchCache,
    SearchHit,
    SearchTool,
    format_hits,
    normalize_query,
)

__all__ = [
    "ARPOCacheBackend",
    "BM25Backend",
    "BM25Index",
    "HTTPSearchBackend",
    "PythonTool",
    "SandboxResult",
    "SearchBackend",
    "SearchCache",
    "SearchHit",
    "SearchTool",
    "Tool",
    "ToolCall",
    "ToolError",
    "ToolOutput",
    "ToolRegistry",
    "ToolResult",
    "ToolStats",
    "format_hits",
    "normalize_query",
    "tool",
]
