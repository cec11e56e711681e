// The script editor: CodeMirror 6 with bash (the legacy shell mode), Python and JavaScript
// highlighting, line numbers, history, bracket matching and the default keymap. Tab indents;
// Escape then Tab leaves the editor (CodeMirror's tab-focus escape), so the form stays keyboard
// navigable. Loaded on demand (a chunk of its own) by the event editor.

import { defaultKeymap, history, historyKeymap, indentWithTab } from "@codemirror/commands";
import { javascript } from "@codemirror/lang-javascript";
import { python } from "@codemirror/lang-python";
import { HighlightStyle, StreamLanguage, bracketMatching, indentOnInput, syntaxHighlighting } from "@codemirror/language";
import { shell } from "@codemirror/legacy-modes/mode/shell";
import { Compartment, EditorState } from "@codemirror/state";
import { EditorView, drawSelection, highlightActiveLine, highlightActiveLineGutter, keymap, lineNumbers } from "@codemirror/view";
import { tags } from "@lezer/highlight";

import type { ScriptKind } from "../api";

export interface ScriptEditor {
  readonly view: EditorView;
  value(): string;
  setKind(kind: ScriptKind): void;
  setReadOnly(readOnly: boolean): void;
}

function language(kind: ScriptKind) {
  switch (kind) {
    case "python":
      return python();
    case "nodejs":
      return javascript();
    default:
      return StreamLanguage.define(shell);
  }
}

// Colours come from the page's CSS variables, so the editor follows the light/dark theme.
const highlight = HighlightStyle.define([
  { tag: [tags.keyword, tags.controlKeyword, tags.operatorKeyword], color: "var(--code-keyword)" },
  { tag: [tags.string, tags.special(tags.string)], color: "var(--code-string)" },
  { tag: [tags.comment, tags.lineComment, tags.blockComment], color: "var(--code-comment)", fontStyle: "italic" },
  { tag: [tags.number, tags.bool, tags.null], color: "var(--code-number)" },
  { tag: [tags.variableName, tags.special(tags.variableName)], color: "var(--code-variable)" },
  { tag: [tags.function(tags.variableName), tags.definition(tags.function(tags.variableName))], color: "var(--code-function)" },
  { tag: [tags.typeName, tags.className], color: "var(--code-type)" },
  { tag: [tags.operator, tags.punctuation], color: "var(--code-operator)" },
]);

const theme = EditorView.theme({
  "&": { backgroundColor: "var(--input-bg)", color: "var(--text)", border: "1px solid var(--border)", borderRadius: "4px" },
  "&.cm-focused": { outline: "2px solid var(--accent)" },
  ".cm-content": { fontFamily: "var(--mono)", fontSize: "0.9rem", caretColor: "var(--text)" },
  ".cm-gutters": { backgroundColor: "var(--panel)", color: "var(--muted)", borderRight: "1px solid var(--border)" },
  ".cm-activeLine": { backgroundColor: "var(--active-line)" },
  ".cm-activeLineGutter": { backgroundColor: "var(--active-line)" },
  "&.cm-focused .cm-selectionBackground, .cm-selectionBackground": { backgroundColor: "var(--selection)" },
  ".cm-scroller": { minHeight: "14rem", maxHeight: "60vh" },
});

export function createScriptEditor(parent: HTMLElement, doc: string, kind: ScriptKind, label: string): ScriptEditor {
  const languageSlot = new Compartment();
  const readOnlySlot = new Compartment();
  const view = new EditorView({
    parent,
    state: EditorState.create({
      doc,
      extensions: [
        lineNumbers(),
        highlightActiveLineGutter(),
        history(),
        drawSelection(),
        indentOnInput(),
        bracketMatching(),
        highlightActiveLine(),
        syntaxHighlighting(highlight),
        keymap.of([...defaultKeymap, ...historyKeymap, indentWithTab]),
        languageSlot.of(language(kind)),
        readOnlySlot.of([]),
        theme,
        EditorView.contentAttributes.of({ "aria-label": label, id: "script-editor" }),
      ],
    }),
  });
  return {
    view,
    value: () => view.state.doc.toString(),
    setKind: (next) => view.dispatch({ effects: languageSlot.reconfigure(language(next)) }),
    setReadOnly: (readOnly) =>
      view.dispatch({
        effects: readOnlySlot.reconfigure(readOnly ? [EditorState.readOnly.of(true), EditorView.editable.of(false)] : []),
      }),
  };
}
