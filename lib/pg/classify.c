/* lib/pg/classify.c — keel_pg_classify(): can this SQL run on a replica?
 *
 * A small lexer that knows what it must not look into (comments, nested
 * block comments, strings with their escapes, quoted names, dollar
 * quotes) yields words, quoted names and parentheses; each statement is then judged by
 * its first word and, for the read kinds, by words that betray a write.
 * Anything not recognised as a read is a write: sending a read to the
 * primary costs a little load, sending a write to a replica fails.
 */
#include <string.h>

#include "pg_int.h"

typedef enum kind { T_END, T_WORD, T_QUOTED, T_LPAREN, T_RPAREN, T_SEMI, T_OTHER } kind;

typedef struct tok {
    kind k;
    const char *s;
    size_t n;
} tok;

static bool word_char(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           c == '_' || c == '$' || c >= 0x80;
}

static bool word_start(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c >= 0x80;
}

static bool is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

/* Past a -- comment at p: to a newline, \n or \r, as PostgreSQL ends it. */
static const char *skip_line_comment(const char *p)
{
    while (*p && *p != '\n' && *p != '\r')
        p++;
    return p;
}

static const char *skip_space_and_comments(const char *p)
{
    for (;;) {
        while (is_space(*p))
            p++;
        if (p[0] == '-' && p[1] == '-') {
            p = skip_line_comment(p);
        } else if (p[0] == '/' && p[1] == '*') { /* they nest in PostgreSQL */
            int depth = 0;
            do {
                if (p[0] == '/' && p[1] == '*') {
                    depth++;
                    p += 2;
                } else if (p[0] == '*' && p[1] == '/') {
                    depth--;
                    p += 2;
                } else {
                    p++;
                }
            } while (*p && depth > 0);
        } else {
            return p;
        }
    }
}

/* Past a quoted run that opened at p[0] == q; a doubled quote stays
 * inside, and with `backslash` so does an escaped character. */
static const char *skip_quoted(const char *p, char q, bool backslash)
{
    for (p++; *p; p++) {
        if (backslash && *p == '\\' && p[1]) {
            p++;
        } else if (*p == q) {
            if (p[1] != q)
                return p + 1;
            p++;
        }
    }
    return p;
}

/* Past a string constant at p (its opening quote), with the continuations
 * PostgreSQL joins to it: another quoted part after whitespace and --
 * comments holding a newline, read in the same mode (E'a'<newline>'\''
 * and E'a' -- c<newline>'\'' are one string). */
static const char *skip_string(const char *p, bool backslash)
{
    for (;;) {
        p = skip_quoted(p, '\'', backslash);
        const char *q = p;
        bool newline = false;
        for (;;) {
            if (is_space(*q)) {
                newline |= *q == '\n' || *q == '\r';
                q++;
            } else if (q[0] == '-' && q[1] == '-') {
                q = skip_line_comment(q);
            } else {
                break;
            }
        }
        if (!newline || *q != '\'')
            return p;
        p = q;
    }
}

/* A dollar quote $tag$...$tag$ at p, or NULL if p does not open one. */
static const char *skip_dollar(const char *p)
{
    const char *t = p + 1;
    if (*t != '$' && !word_start((unsigned char)*t))
        return NULL;
    while (*t != '$' && word_char((unsigned char)*t))
        t++;
    if (*t != '$')
        return NULL;
    size_t taglen = (size_t)(t - p + 1);
    for (const char *q = t + 1; *q; q++)
        if (*q == '$' && strncmp(q, p, taglen) == 0)
            return q + taglen;
    return p + strlen(p);
}

static tok next(const char **pp)
{
    const char *p = skip_space_and_comments(*pp);
    tok t = {T_OTHER, p, 1};
    unsigned char c = (unsigned char)*p;
    if (!c) {
        t.k = T_END;
        t.n = 0;
    } else if (c == '\'') {
        p = skip_string(p, false);
        t.n = (size_t)(p - t.s);
    } else if (c == '"') {
        p = skip_quoted(p, '"', false);
        t.k = T_QUOTED;
        t.n = (size_t)(p - t.s);
    } else if (c == '$') {
        const char *end = skip_dollar(p);
        for (p = end ? end : p + 1; !end && *p >= '0' && *p <= '9';)
            p++; /* $1: a parameter */
        t.n = (size_t)(p - t.s);
    } else if (word_start(c)) {
        while (word_char((unsigned char)*p))
            p++;
        t.n = (size_t)(p - t.s);
        /* E'...' (backslash escapes), B'', X'', N'', U&'' are strings */
        if (*p == '\'' && t.n == 1) {
            p = skip_string(p, c == 'e' || c == 'E');
            t.n = (size_t)(p - t.s);
        } else if (t.n == 1 && (c == 'u' || c == 'U') && p[0] == '&' && p[1] == '\'') {
            p = skip_string(p + 1, false);
            t.n = (size_t)(p - t.s);
        } else if (t.n == 1 && (c == 'u' || c == 'U') && p[0] == '&' && p[1] == '"') {
            t.s = p + 1; /* U&"name": a quoted name */
            p = skip_quoted(p + 1, '"', false);
            t.k = T_QUOTED;
            t.n = (size_t)(p - t.s);
        } else {
            t.k = T_WORD;
        }
    } else {
        t.k = c == '(' ? T_LPAREN : c == ')' ? T_RPAREN : c == ';' ? T_SEMI : T_OTHER;
        p++;
    }
    *pp = p;
    return t;
}

static bool is(tok t, const char *w)
{
    size_t n = strlen(w);
    if (t.k != T_WORD || t.n != n)
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = t.s[i];
        if ((c >= 'A' && c <= 'Z' ? c + 32 : c) != w[i])
            return false;
    }
    return true;
}

static bool is_any(tok t, const char *const *words)
{
    for (; *words; words++)
        if (is(t, *words))
            return true;
    return false;
}

/* A function's name, lower-cased (a quoted one as written): false when
 * it is not a name or is too long to be one of ours. */
static bool fn_name(tok t, char *out, size_t size)
{
    const char *s = t.s;
    size_t n = t.n;
    if (t.k == T_QUOTED) { /* "name": no doubled quotes in the names we look for */
        s++;
        n = n >= 2 ? n - 2 : 0;
    } else if (t.k != T_WORD) {
        return false;
    }
    if (n == 0 || n >= size)
        return false;
    for (size_t i = 0; i < n; i++)
        out[i] = t.k == T_WORD && s[i] >= 'A' && s[i] <= 'Z' ? (char)(s[i] + 32) : s[i];
    out[n] = '\0';
    return true;
}

/* Functions that write, that fail during recovery, or whose effect must be
 * on the primary (advisory locks): whole names, then prefixes. */
static bool write_function(tok t)
{
    static const char *const names[] = {
        "nextval", "setval", "txid_current", "pg_current_xact_id", "pg_notify",
        "pg_switch_wal", "pg_walfile_name", "pg_walfile_name_offset", "pg_log_standby_snapshot",
        "pg_logical_emit_message", "pg_import_system_collations", "pg_drop_replication_slot",
        "pg_copy_physical_replication_slot", "pg_copy_logical_replication_slot",
        "pg_replication_slot_advance", "pg_promote", NULL,
    };
    static const char *const prefixes[] = {
        "lo_", "pg_current_wal_", "pg_create_", "pg_advisory_", "pg_try_advisory_",
        "pg_replication_origin_", "pg_logical_slot_", NULL,
    };
    char name[64];
    if (!fn_name(t, name, sizeof name))
        return false;
    for (const char *const *w = names; *w; w++)
        if (strcmp(name, *w) == 0)
            return true;
    for (const char *const *w = prefixes; *w; w++)
        if (strncmp(name, *w, strlen(*w)) == 0)
            return true;
    return false;
}

static const char *const dml[] = {"insert", "update", "delete", "merge", "into", NULL};

/* Whether token t, after prev, betrays a write inside a read. */
static bool writes(tok prev, tok t)
{
    static const char *const locks[] = {"share", "no", "key", NULL}; /* FOR SHARE, FOR NO KEY.. */
    return is_any(t, dml) || (is(prev, "for") && is_any(t, locks)) ||
           (t.k == T_LPAREN && write_function(prev));
}

/* The rest of a read statement, to its end: does anything in it write? */
static bool body_writes(const char **pp)
{
    tok prev = {T_END, NULL, 0};
    for (;;) {
        tok t = next(pp);
        if (t.k == T_END || t.k == T_SEMI)
            return false;
        if (writes(prev, t))
            return true;
        prev = t;
    }
}

/* Skips to the end of the statement. */
static void skip_statement(const char **pp)
{
    tok t;
    do
        t = next(pp);
    while (t.k != T_END && t.k != T_SEMI);
}

static const char *const reads[] = {"select", "values", "table", "with", "show", NULL};

/* One statement: 1 a read, 0 a write, -1 empty. */
static int statement(const char **pp)
{
    tok t = next(pp);
    while (t.k == T_LPAREN) /* (SELECT ...) UNION (SELECT ...) */
        t = next(pp);
    if (t.k == T_END || t.k == T_SEMI)
        return -1;
    if (is(t, "explain")) { /* EXPLAIN [ANALYZE] [VERBOSE] | (options) statement */
        t = next(pp);
        if (t.k == T_LPAREN) {
            int depth = 1;
            while (depth > 0 && t.k != T_END) {
                t = next(pp);
                depth += t.k == T_LPAREN ? 1 : t.k == T_RPAREN ? -1 : 0;
            }
            t = next(pp);
        }
        while (is(t, "analyze") || is(t, "analyse") || is(t, "verbose"))
            t = next(pp);
        while (t.k == T_LPAREN)
            t = next(pp);
    }
    if (is_any(t, reads))
        return body_writes(pp) ? 0 : 1;
    if (is(t, "copy")) { /* COPY ... TO reads; FROM writes */
        int depth = 0;
        tok prev = t;
        for (;;) {
            t = next(pp);
            if (t.k == T_END || t.k == T_SEMI)
                return 0;
            if (writes(prev, t)) /* COPY (INSERT ... RETURNING), (SELECT nextval..) TO */
                return 0;
            depth += t.k == T_LPAREN ? 1 : t.k == T_RPAREN ? -1 : 0;
            if (depth == 0 && (is(t, "to") || is(t, "from")))
                break;
            prev = t;
        }
        return is(t, "to") ? !body_writes(pp) : 0;
    }
    skip_statement(pp);
    return 0;
}

/* Statements that run inside the transaction they find and cannot end it
 * (a function they call cannot commit; only CALL and DO can). */
static const char *const in_xact[] = {"select", "values", "table", "with", "show", "insert",
                                      "update", "delete", "merge", NULL};

bool keel__pg_keeps_xact(const char *sql)
{
    if (!sql)
        return false;
    const char *p = sql;
    tok t = next(&p);
    while (t.k == T_LPAREN) /* (SELECT ...) UNION (SELECT ...) */
        t = next(&p);
    if (!is_any(t, in_xact))
        return false;
    skip_statement(&p);
    for (t = next(&p); t.k == T_SEMI; t = next(&p))
        ;
    return t.k == T_END; /* one statement: what follows is not looked at */
}

KEEL_API keel_pg_mode keel_pg_classify(const char *sql)
{
    if (!sql)
        return KEEL_PG_WRITE;
    const char *p = sql;
    bool any = false;
    while (*skip_space_and_comments(p)) {
        int r = statement(&p);
        if (r == 0)
            return KEEL_PG_WRITE;
        any |= r == 1;
    }
    return any ? KEEL_PG_READ : KEEL_PG_WRITE;
}
