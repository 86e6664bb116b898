"""LangChain's `with_structured_output` against a running flashmoe server (argv[1] = base URL)."""
import sys
from typing import Literal

from langchain_openai import ChatOpenAI
from pydantic import BaseModel


class Line(BaseModel):
    speaker: Literal["ROMEO", "JULIET", "NURSE"]
    mood: Literal["happy", "sad"]


llm = ChatOpenAI(base_url=sys.argv[1], api_key="not-needed", model="flashmoe-default", temperature=0, max_tokens=80)
# json_schema: response_format; function_calling: a tool_choice that names the schema's function
for method in ("json_schema", "function_calling"):
    r = llm.with_structured_output(Line, method=method).invoke("Who speaks?")
    assert isinstance(r, Line), (method, r)
print("all langchain checks passed")
